"""Model registry: register logged models under the policy's names and promote them by alias (see `deploy.pull` for deployment)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pydantic
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cifarflow.errors import CifarflowError
from cifarflow.tracking.refs import CHALLENGER, CHAMPION, Source, VersionRef, mlflow_client

# Metrics written into the version's description and the pulled model card.
CARD_METRICS = ("test_accuracy", "test_loss", "nll", "macro_f1", "ece", "test_accuracy_tta", "param_count")


class Policy(pydantic.BaseModel):
    """``registry/policy.yaml``: registered names per architecture and the promotion rule.

    ``min_improvement`` is in the metric's own unit (a fraction for accuracies).
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    metric: str = "test_accuracy"
    greater_is_better: bool = True
    min_improvement: float = pydantic.Field(0.0, ge=0)
    models: dict[str, str]


def policy_path() -> Path:
    """``$CIFARFLOW_POLICY``, else ``registry/policy.yaml`` of the working directory, else of the source checkout."""
    env = os.environ.get("CIFARFLOW_POLICY")
    if env:
        return Path(env)
    local = Path.cwd() / "registry" / "policy.yaml"
    if local.is_file():
        return local
    return Path(__file__).resolve().parents[3] / "registry" / "policy.yaml"


def load_policy(path: Path | None = None) -> Policy:
    """Read and validate the promotion policy.

    Raises:
        CifarflowError: missing file, invalid YAML or bad values.
    """
    path = path or policy_path()
    if not path.is_file():
        raise CifarflowError(f"no registry policy at {path}", "create registry/policy.yaml or set $CIFARFLOW_POLICY")
    try:
        return Policy(**(yaml.safe_load(path.read_text()) or {}))
    except (yaml.YAMLError, pydantic.ValidationError, TypeError) as exc:
        raise CifarflowError(f"invalid registry policy {path}: {exc}", "fix the file; see registry/policy.yaml") from None


def registered_name(run_params: dict[str, str], policy: Policy) -> str:
    """The registered model name of a run's architecture (its ``model`` param) from the policy.

    Raises:
        CifarflowError: the architecture has no name in the policy.
    """
    arch = run_params.get("model", "")
    if arch not in policy.models:
        raise CifarflowError(f"architecture '{arch}' has no registered model name in {policy_path()}",
                             f"add '{arch}: cifarflow-{arch}' under models:, or pass --name")
    return policy.models[arch]


def _description(run, source: Source) -> str:
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    arch = ", ".join(f"{k}={p[k]}" for k in ("width", "depth", "blocks", "dense_units", "dropout") if k in p)
    metrics = ", ".join(f"{k}={m[k]:.4f}" for k in CARD_METRICS if k in m and k != "param_count")
    count = m.get("param_count", m.get("params", 0))  # `params` before 2026-11
    return (f"{t.get('cifarflow.recipe', '?')} ({p.get('model', '?')}: {arch}; {count:,.0f} parameters), "
            f"trained {p.get('epochs', '?')} epochs on {p.get('train_images', '?')} images of {p.get('data_source', '?')} "
            f"(dataset sha256 {t.get('cifarflow.dataset_sha256', '?')}). Test: {metrics}. "
            f"Source run {source.run_id}, logged model {source.model_uri}.")


def register(source: Source, name: str | None = None) -> VersionRef:
    """Register ``source`` as a new version of ``name`` (the policy's name for its architecture when None).

    The version gets a description (architecture, parameter count, dataset
    checksum, test metrics), the tags a deployer needs (``cifarflow.recipe``,
    ``cifarflow.architecture``, ``cifarflow.dataset_sha256``,
    ``cifarflow.source_run_id``, ``cifarflow.model_uri`` and ``metric.<policy
    metric>`` at full precision; the other figures stay in the run) and the
    ``challenger`` alias.

    Raises:
        CifarflowError: no registered name for the architecture.
    """
    client = mlflow_client()
    run = client.get_run(source.run_id)
    policy = load_policy()
    name = name or registered_name(run.data.params, policy)
    t = run.data.tags
    tags = {
        "cifarflow.recipe": t.get("cifarflow.recipe", ""),
        "cifarflow.architecture": run.data.params.get("model", ""),
        "cifarflow.dataset_sha256": t.get("cifarflow.dataset_sha256", ""),
        "cifarflow.source_run_id": source.run_id,
        "cifarflow.model_uri": source.model_uri,
        **{f"metric.{k}": repr(v) for k, v in run.data.metrics.items() if k == policy.metric},
    }
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"cifarflow {run.data.params.get('model', '')} models "
                                                         "(raw 0..255 RGB pixels (batch, 32, 32, 3) in, softmax out)")
    version = client.create_model_version(name, source=source.model_uri, run_id=source.run_id, tags=tags,
                                          description=_description(run, source), model_id=source.model_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return VersionRef(name=name, version=str(version.version), run_id=source.run_id)


def _metric_of(client: MlflowClient, name: str, version: str, metric: str) -> float:
    mv = client.get_model_version(name, version)
    if mv.run_id:
        try:
            value = client.get_run(mv.run_id).data.metrics.get(metric)
            if value is not None:
                return float(value)
        except MlflowException:
            pass
    if f"metric.{metric}" in mv.tags:
        return float(mv.tags[f"metric.{metric}"])
    raise CifarflowError(f"{name} version {version} has no metric '{metric}'",
                         "the policy metric must be a final metric of the training runs")


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`promote`: whether ``champion`` moved, and the figures compared."""

    promoted: bool
    name: str
    challenger: str
    champion_before: str | None
    metric: str
    challenger_value: float
    champion_value: float | None
    reason: str


def promote(name: str, *, force: bool = False) -> Decision:
    """Move the ``champion`` alias of ``name`` to its ``challenger`` if the policy allows it.

    The challenger wins when it beats the champion on the policy metric by at
    least ``min_improvement`` (``challenger - champion >= min_improvement``,
    sign flipped when lower is better), measured on the same test set (equal
    ``cifarflow.dataset_sha256`` tags). With no champion yet, the challenger
    becomes champion. The decision and both figures are recorded as tags
    ``cifarflow.promotion.*`` of the challenger version, also when it loses.

    Args:
        name: registered model name.
        force: move the alias even when the policy says no (recorded as ``forced``).

    Raises:
        CifarflowError: unknown model, no challenger, or different test sets
            (without ``force``).
    """
    client = mlflow_client()
    policy = load_policy()
    try:
        challenger = client.get_model_version_by_alias(name, CHALLENGER)
    except MlflowException:
        raise CifarflowError(f"'{name}' has no {CHALLENGER} version",
                             "register one first: cifarflow register RUN_ID|MODEL_URI|--best-of EXPERIMENT") from None
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    metric = policy.metric
    new = _metric_of(client, name, challenger.version, metric)
    old = _metric_of(client, name, champion.version, metric) if champion else None
    before = str(champion.version) if champion else None
    same_data = True
    if champion is None:
        decision, reason = "promoted", "no champion yet"
    elif before == str(challenger.version):
        return Decision(promoted=False, name=name, challenger=before, champion_before=before, metric=metric,
                        challenger_value=new, champion_value=old, reason=f"version {before} is already the champion")
    else:
        new_sha = challenger.tags.get("cifarflow.dataset_sha256")
        old_sha = champion.tags.get("cifarflow.dataset_sha256")
        same_data = bool(new_sha) and new_sha == old_sha
        if not same_data:
            beats = False
            reason = f"different test sets: dataset sha256 {new_sha or 'unknown'} vs champion's {old_sha or 'unknown'}"
        else:
            gain = (new - old) if policy.greater_is_better else (old - new)
            beats = gain >= policy.min_improvement - 1e-12
            reason = (f"{metric} {new:.4f} {'beats' if beats else 'does not beat'} champion v{before} {old:.4f} "
                      f"by the required {policy.min_improvement:g} (gain {gain:+.4f})")
        decision = "promoted" if beats else ("forced" if force else "rejected")
        if decision == "forced":
            reason = f"forced: {reason}"
    _record(client, name, challenger.version, decision, new, old, before, reason)
    if decision == "rejected" and not same_data:
        raise CifarflowError(f"cannot compare {name} v{challenger.version} with champion v{before}: {reason}",
                             "evaluate both on the same data, or pass --force to promote anyway")
    promoted = decision != "rejected"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
        if champion is not None:
            client.set_model_version_tag(name, champion.version, "cifarflow.promotion.replaced_by", str(challenger.version))
    return Decision(promoted=promoted, name=name, challenger=str(challenger.version),
                    champion_before=before, metric=metric,
                    challenger_value=new, champion_value=old, reason=reason)


def _record(client, name, version, decision, new, old, champion_version, reason) -> None:
    tags = {
        "decision": decision,
        "challenger_value": repr(new),
        "champion_value": "none" if old is None else repr(old),
        "champion_version": champion_version or "none",
        "reason": reason,  # names the metric and the required margin
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, f"cifarflow.promotion.{k}", str(v))


