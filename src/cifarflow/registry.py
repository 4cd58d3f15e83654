"""Model registry: register logged models under the policy's names, promote by alias, pull for deployment."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pydantic
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cifarflow import tracking
from cifarflow.errors import CifarflowError

CHAMPION = "champion"
CHALLENGER = "challenger"
# Final metrics where lower is better (for --best-of); every other metric is higher-is-better.
LOWER_IS_BETTER = ("test_loss", "nll", "ece", "train_seconds", "params", "trainable_params")
# Metrics copied into the version's description and tags.
CARD_METRICS = ("test_accuracy", "test_loss", "nll", "macro_f1", "ece", "test_accuracy_tta", "params")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class Policy(pydantic.BaseModel):
    """``registry/policy.yaml``: registered names per architecture and the promotion rule.

    ``min_improvement`` is in the metric's own unit (a fraction for accuracies).
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    metric: str = "test_accuracy"
    greater_is_better: bool = True
    min_improvement: float = pydantic.Field(0.0, ge=0)
    models: dict[str, str]


@dataclass(frozen=True)
class Source:
    """A logged model and the training run that produced it."""

    model_uri: str  # models:/<model_id>
    model_id: str
    run_id: str


@dataclass(frozen=True)
class VersionRef:
    """One registered model version, resolved from ``NAME@ALIAS``, ``NAME/VERSION`` or a ``models:/`` URI."""

    name: str
    version: str
    run_id: str | None

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``."""
        return f"models:/{self.name}/{self.version}"


def policy_path() -> Path:
    """``$CIFARFLOW_POLICY``, else ``registry/policy.yaml`` of the working directory, else of the source checkout."""
    env = os.environ.get("CIFARFLOW_POLICY")
    if env:
        return Path(env)
    local = Path.cwd() / "registry" / "policy.yaml"
    if local.is_file():
        return local
    return Path(__file__).resolve().parents[2] / "registry" / "policy.yaml"


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


def mlflow_client() -> MlflowClient:
    """An MLflow client on the configured tracking store (see :func:`cifarflow.tracking.configure`)."""
    tracking.configure()
    return MlflowClient()


def _source_of_run(client: MlflowClient, run_id: str) -> Source:
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise CifarflowError(f"no run {run_id} in {mlflow.get_tracking_uri()}",
                             "pass a run id or models:/<model_id> from `cifarflow train`, or set MLFLOW_TRACKING_URI") from None
    uri = run.data.tags.get("cifarflow.model_uri")
    if not uri:
        raise CifarflowError(f"run {run_id} has no logged model (status {run.info.status})",
                             "register a finished run of `cifarflow train`")
    model_id = uri.removeprefix("models:/")
    return Source(model_uri=uri, model_id=model_id, run_id=run_id)


def resolve_source(source: str | None = None, *, best_of: str | None = None,
                   metric: str = "test_accuracy") -> Source:
    """The logged model to register: a ``models:/<model_id>`` URI, a run id, or the best run of an experiment.

    Args:
        source: ``models:/m-...`` or a 32-hex run id.
        best_of: experiment name (``cifarflow/cnn_small``; a bare recipe name
            is looked up as ``cifarflow/<recipe>``): its finished run with a
            logged model and the best ``metric`` is taken.
        metric: the final metric ranking ``best_of`` (lower is better for
            losses, see :data:`LOWER_IS_BETTER`).

    Raises:
        CifarflowError: none or both of ``source``/``best_of``, an unknown id
            or experiment, or no finished run with the metric.
    """
    client = mlflow_client()
    if bool(source) == bool(best_of):
        raise CifarflowError("give exactly one of MODEL_URI, RUN_ID or --best-of EXPERIMENT",
                             "e.g. cifarflow register --best-of cifarflow/cnn_small")
    if source and source.startswith("models:/"):
        model_id = source.removeprefix("models:/")
        try:
            logged = mlflow.get_logged_model(model_id)
        except MlflowException:
            raise CifarflowError(f"no logged model {source}",
                                 "pass the models:/m-... URI printed by `cifarflow train` (run tag cifarflow.model_uri)") from None
        if not logged.source_run_id:
            raise CifarflowError(f"logged model {source} has no source run", "register a model logged by `cifarflow train`")
        return Source(model_uri=source, model_id=model_id, run_id=logged.source_run_id)
    if source:
        if not _RUN_ID.match(source):
            raise CifarflowError(f"'{source}' is neither models:/<model_id> nor a run id", "pass one printed by `cifarflow train`")
        return _source_of_run(client, source)
    experiment = client.get_experiment_by_name(best_of) or client.get_experiment_by_name(tracking.experiment_name(best_of))
    if experiment is None:
        raise CifarflowError(f"no experiment '{best_of}'", "pass an experiment name such as cifarflow/cnn_small")
    order = "ASC" if metric in LOWER_IS_BETTER else "DESC"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.status = 'FINISHED' and tags.`cifarflow.model_uri` LIKE 'models:/%' "
                      f"and metrics.`{metric}` > -1e300",
        order_by=[f"metrics.`{metric}` {order}"], max_results=1,
    )
    if not runs:
        raise CifarflowError(f"no finished run with a logged model and metric '{metric}' in '{experiment.name}'",
                             "train one with `cifarflow train`, or pick another --metric")
    return _source_of_run(client, runs[0].info.run_id)


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
    metrics = ", ".join(f"{k}={m[k]:.4f}" for k in CARD_METRICS if k in m and k != "params")
    return (f"{t.get('cifarflow.recipe', '?')} ({p.get('model', '?')}: {arch}; {m.get('params', 0):.0f} params), "
            f"trained {p.get('epochs', '?')} epochs on {p.get('train_images', '?')} images of {p.get('data_source', '?')} "
            f"(dataset sha256 {t.get('cifarflow.dataset_sha256', '?')}). Test: {metrics}. "
            f"Source run {source.run_id}, logged model {source.model_uri}.")


def register(source: Source, name: str | None = None) -> VersionRef:
    """Register ``source`` as a new version of ``name`` (the policy's name for its architecture when None).

    The version gets a description (architecture, params, dataset checksum,
    metrics), tags (``cifarflow.recipe``, ``cifarflow.dataset_sha256``,
    ``cifarflow.source_run_id``, ``cifarflow.model_uri``, ``metric.<name>``)
    and the ``challenger`` alias.

    Raises:
        CifarflowError: no registered name for the architecture.
    """
    client = mlflow_client()
    run = client.get_run(source.run_id)
    name = name or registered_name(run.data.params, load_policy())
    t = run.data.tags
    tags = {
        "cifarflow.recipe": t.get("cifarflow.recipe", ""),
        "cifarflow.architecture": run.data.params.get("model", ""),
        "cifarflow.dataset_sha256": t.get("cifarflow.dataset_sha256", ""),
        "cifarflow.source_run_id": source.run_id,
        "cifarflow.model_uri": source.model_uri,
        **{f"metric.{k}": repr(v) for k, v in run.data.metrics.items() if k in CARD_METRICS},
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


def resolve_version(ref: str) -> VersionRef:
    """A registered version from ``NAME@ALIAS``, ``NAME/VERSION``, ``NAME`` (its champion) or the same with ``models:/``.

    Raises:
        CifarflowError: unknown model, version or alias.
    """
    client = mlflow_client()
    body = ref.removeprefix("models:/")
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:
            mv = client.get_model_version_by_alias(body, CHAMPION)
    except MlflowException as exc:
        raise CifarflowError(f"no registered model version '{ref}': {str(exc).splitlines()[0]}",
                             "use NAME@champion, NAME@challenger or NAME/VERSION of a registered model") from None
    run_id = mv.run_id or mv.tags.get("cifarflow.source_run_id")
    return VersionRef(name=mv.name, version=str(mv.version), run_id=run_id)


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
    _record(client, name, challenger.version, decision, metric, new, old, before, reason, policy)
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


def _record(client, name, version, decision, metric, new, old, champion_version, reason, policy) -> None:
    tags = {
        "decision": decision,
        "metric": metric,
        "challenger_value": repr(new),
        "champion_value": "none" if old is None else repr(old),
        "champion_version": champion_version or "none",
        "min_improvement": repr(policy.min_improvement),
        "reason": reason,
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, f"cifarflow.promotion.{k}", str(v))


def load_keras(model_uri: str):
    """Load a logged or registered Keras model (``models:/...``) from a private temporary copy.

    MLflow loads a registered version straight from a local artifact store and
    then writes a ``registered_model_meta`` file into the source model's
    artifact folder (``ModelsArtifactRepository.download_artifacts``); copying
    to a temporary folder first keeps the training run's artifacts untouched
    (they may belong to someone else, or be read-only).

    Returns:
        The ``keras.Model`` (raw 0..255 pixels in, softmax out).

    Raises:
        CifarflowError: the model has no Keras flavor (e.g. a `cifarflow ensemble` pyfunc model).
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return mlflow.keras.load_model(model_uri, dst_path=tmp)
        except (MlflowException, KeyError) as exc:  # MLflow 3.17 raises KeyError('keras') for another flavor
            if isinstance(exc, MlflowException) and "flavor" not in str(exc):
                raise
            raise CifarflowError(f"{model_uri} is not a Keras model (a pyfunc model such as an ensemble)",
                                 "serve it with `mlflow models serve -m URI`, load it with mlflow.pyfunc.load_model, "
                                 "or pull it with --format mlflow") from None


def run_test_data(run, data: str | None = None):
    """The dataset a training run was tested on: its ``data_source`` (or ``data``),
    ``skip_corrupt``/``resize`` options and ``classes`` subset.

    Args:
        run: an MLflow ``Run`` of ``cifarflow train``.
        data: another path to the same data (e.g. where the run's path is not
            valid on this machine).

    Raises:
        CifarflowError: the data's sha256 differs from the run's
            ``cifarflow.dataset_sha256`` tag.
    """
    from cifarflow import data as d
    from cifarflow.config import parse_value

    p = run.data.params
    source = data or p.get("data_source") or p.get("data") or "cifar10"
    flag = lambda k: str(p.get(k, "False")).lower() == "true"  # noqa: E731
    ds = d.load(source, skip_corrupt=flag("skip_corrupt"), resize=flag("resize"))
    expected = run.data.tags.get("cifarflow.dataset_sha256")
    if expected and ds.checksum != expected:
        raise CifarflowError(f"data {source} (sha256 {ds.checksum[:12]}) is not the data run {run.info.run_id} was "
                             f"trained and tested on (sha256 {expected[:12]})", "pass the same data with --data")
    classes = p.get("classes")
    return d.select_classes(ds, None if classes in (None, "None", "null") else parse_value(classes))


def download_run_artifact(run_id: str, path: str, dest: Path) -> Path:
    """Download one artifact file of a run into folder ``dest``; returns its local path.

    Raises:
        MlflowException: no such artifact.
    """
    dest.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dest)))


def model_card(ref: VersionRef, fmt: str, file_name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``model_card.json`` content of a pulled version: classes, input and output spec, metrics, provenance."""
    client = mlflow_client()
    mv = client.get_model_version(ref.name, ref.version)
    run = client.get_run(ref.run_id) if ref.run_id else None
    classes: list[str] = []
    if run is not None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                classes = json.loads(download_run_artifact(run.info.run_id, "classes.json", Path(tmp)).read_text())
            except (MlflowException, OSError):
                classes = []
    metrics = run.data.metrics if run else {}
    return {
        "name": ref.name,
        "version": ref.version,
        "aliases": list(mv.aliases),
        "format": fmt,
        "file": file_name,
        "classes": classes,
        "input": {"name": "pixels", "shape": [None, 32, 32, 3], "dtype": "float32", "layout": "NHWC",
                  "channels": "RGB", "range": [0, 255]},
        "output": {"shape": [None, len(classes) or None], "dtype": "float32",
                   "meaning": "softmax probabilities, column i is classes[i]"},
        "preprocessing": "none: feed raw 0..255 RGB pixels as decoded from the image files, 32x32; "
                         "scaling and normalization are inside the model",
        "metrics": {k: metrics[k] for k in CARD_METRICS if k in metrics},
        "dataset_sha256": mv.tags.get("cifarflow.dataset_sha256"),
        "source_run_id": ref.run_id,
        "model_uri": mv.tags.get("cifarflow.model_uri") or mv.source,
        "registered_uri": ref.uri,
        **(extra or {}),
    }


def pull(ref: str, fmt: str, dest: Path, quantize: str = "none") -> Path:
    """Download a registered version for deployment into ``dest`` with a ``model_card.json``.

    Args:
        ref: ``NAME@ALIAS``, ``NAME/VERSION`` or ``NAME`` (its champion).
        fmt: ``keras`` (the logged model saved as ``model.keras``), ``mlflow``
            (the MLflow model folder ``model/``, any flavor: ``mlflow models
            serve -m`` it, or load it with ``mlflow.pyfunc.load_model``), ``onnx`` or
            ``tflite`` (the files made by ``cifarflow export`` for this version).
        dest: output folder (created).
        quantize: which TFLite variant (``none``, ``float16``, ``dynamic``, ``int8``).

    Returns:
        The path of the model file.

    Raises:
        CifarflowError: unknown version, or no export of that format for it.
    """
    version = resolve_version(ref)
    client = mlflow_client()
    mv = client.get_model_version(version.name, version.version)
    dest.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if fmt == "keras":
        model = load_keras(version.uri)
        target = dest / "model.keras"
        model.save(target)
    elif fmt == "mlflow":
        target = dest / "model"
        if target.exists():
            shutil.rmtree(target)
        with tempfile.TemporaryDirectory() as tmp:  # a private copy, see load_keras
            shutil.copytree(mlflow.artifacts.download_artifacts(version.uri, dst_path=tmp), target)
    else:
        from cifarflow.export import artifact_name, kind_of

        kind = kind_of(fmt, quantize)
        export_run = mv.tags.get(f"cifarflow.export.{kind}.run_id")
        if not export_run:
            raise CifarflowError(
                f"{version.name} v{version.version} has no {kind} export",
                f"run: cifarflow export {version.uri} --format {fmt}" + (f" --quantize {quantize}" if fmt == "tflite" else ""))
        name = artifact_name(kind)
        with tempfile.TemporaryDirectory() as tmp:
            got = download_run_artifact(export_run, f"export/{name}", Path(tmp))
            target = dest / name
            shutil.copyfile(got, target)
        extra["export"] = {k.removeprefix(f"cifarflow.export.{kind}."): v for k, v in mv.tags.items()
                           if k.startswith(f"cifarflow.export.{kind}.")}
    card = model_card(version, fmt, target.name, extra)
    (dest / "model_card.json").write_text(json.dumps(card, indent=2))
    return target
