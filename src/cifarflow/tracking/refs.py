"""Model references and loading: which logged model, version and run a reference names, its Keras model and its test data.

The one module every consumer (evaluation, ensembles, export, registry, pull) imports to resolve
``models:/m-...``, ``models:/NAME@ALIAS``, ``NAME/VERSION``, ``runs:/RUN_ID`` and run ids.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cifarflow import tracking
from cifarflow.data import datasets
from cifarflow.errors import CifarflowError
from cifarflow.utils import parse_value

CHAMPION = "champion"
CHALLENGER = "challenger"
# Final metrics where lower is better (for --best-of); every other metric is higher-is-better.
LOWER_IS_BETTER = ("test_loss", "nll", "ece", "train_seconds", "param_count", "trainable_param_count")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


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
    ``skip_corrupt``/``resize``/``trust_data`` options and ``classes`` subset.

    Args:
        run: an MLflow ``Run`` of ``cifarflow train``.
        data: another path to the same data (e.g. where the run's path is not
            valid on this machine).

    Raises:
        CifarflowError: the data's sha256 differs from the run's
            ``cifarflow.dataset_sha256`` tag.
    """
    p = run.data.params
    source = data or p.get("data_source") or p.get("data") or "cifar10"
    flag = lambda k: str(p.get(k, "False")).lower() == "true"  # noqa: E731
    ds = datasets.load(source, skip_corrupt=flag("skip_corrupt"), resize=flag("resize"), trust_data=flag("trust_data"))
    expected = run.data.tags.get("cifarflow.dataset_sha256")
    if expected and ds.checksum != expected:
        raise CifarflowError(f"data {source} (sha256 {ds.checksum[:12]}) is not the data run {run.info.run_id} was "
                             f"trained and tested on (sha256 {expected[:12]})", "pass the same data with --data")
    classes = p.get("classes")
    return datasets.select_classes(ds, None if classes in (None, "None", "null") else parse_value(classes))


def download_run_artifact(run_id: str, path: str, dest: Path) -> Path:
    """Download one artifact file of a run into folder ``dest``; returns its local path.

    Raises:
        MlflowException: no such artifact.
    """
    dest.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dest)))



def resolve_model(ref: str) -> tuple[str, str]:
    """``(model_uri, source_run_id)`` of ``models:/m-...``, ``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/<run_id>[/...]`` or a bare run id.

    Raises:
        CifarflowError: unknown model, version, alias or run.
    """
    if ref.startswith("runs:/"):
        ref = ref.removeprefix("runs:/").split("/", 1)[0]
    if _RUN_ID.match(ref) or ref.startswith("models:/m-"):
        source = resolve_source(ref)
        return source.model_uri, source.run_id
    version = resolve_version(ref)
    if not version.run_id:
        raise CifarflowError(f"registered version {ref} has no source run", "register a run of `cifarflow train`")
    return version.uri, version.run_id
