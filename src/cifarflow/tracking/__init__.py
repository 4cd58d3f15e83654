"""MLflow tracking: store URI, experiment and run names, tags, per-epoch metric logging, model logging."""

from __future__ import annotations

from cifarflow.serving import BACKEND_MODULES, import_tensorflow_quietly

import_tensorflow_quietly()  # before Keras: TensorFlow's C++ start-up lines stay out of the terminal

import contextlib
import logging
import os
import platform
import re
import shlex
import subprocess
import time
from pathlib import Path

import filelock
import keras
import mlflow
import numpy as np

from cifarflow.errors import CifarflowError
from cifarflow.utils import parse_value

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def configure() -> str:
    """Point MLflow at ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory,
    and check that the store can be used before any expensive work.

    MLflow 3.13+ refuses the plain-file ``mlruns/`` store, hence the SQLite default.
    A SQLite store is created or migrated (under :func:`sqlite_lock`) and must
    be writable; a tracking server must answer within a bounded retry (about
    15 s, not MLflow's 254 s of back-off); a database URL must open.

    Returns:
        The tracking URI in use.

    Raises:
        CifarflowError: a corrupt or read-only SQLite store, an unreachable
            server or one that refuses the credentials, a database that does
            not open. URLs in the message have their password masked.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        _check_sqlite_store(uri)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif "://" in uri and not uri.startswith(("file:", "databricks")):
        try:
            mlflow.tracking.MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:
            raise CifarflowError(f"cannot open the MLflow tracking store {mask_url(uri)}: "
                                 f"{type(exc).__name__}: {mask_secrets(str(exc), uri)}"[:400],
                                 "fix MLFLOW_TRACKING_URI, or start the database") from None
    return uri


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: ``postgresql://u:***@host/db`` (also a
    ``password=`` query parameter). Use it wherever a storage or tracking URL is printed or logged."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None and "password=" not in parts.query:
        return url  # nothing to hide: returned as given (urlunsplit would rewrite sqlite:///x as sqlite:/x)
    if password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}")
    if "password=" in parts.query:
        parts = parts._replace(query=re.sub(r"(password=)[^&]*", r"\1***", parts.query))
    return urlunsplit(parts)


def mask_secrets(text: str, url: str) -> str:
    """``text`` (e.g. an exception message) with ``url`` masked and its password removed wherever it appears."""
    from urllib.parse import unquote, urlsplit

    text = text.replace(url, mask_url(url))
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def _check_sqlite_store(uri: str) -> None:
    """Create or migrate the store, then take (and give back) its write lock: a read-only file or
    folder, or a file that is not an MLflow store, is one line before any work."""
    import sqlite3

    db = Path(uri.removeprefix("sqlite:///")).absolute()
    fix = "point MLFLOW_TRACKING_URI at a store you can write, e.g. sqlite:///mlflow.db in a folder of yours"
    try:
        _create_sqlite_store_once(uri)
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=60)) as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE main._cifarflow_write_probe (x)")  # a read-only file or folder fails here
            con.rollback()  # nothing is written
    except Exception as exc:
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            raise CifarflowError(f"{db} is not an MLflow tracking store (SQLite: file is not a database)",
                                 f"move it away, or {fix}") from None
        if isinstance(exc, PermissionError) or "readonly" in text or "read-only" in text \
                or "unable to open" in text:
            raise CifarflowError(f"the MLflow tracking store {db} is read-only for this user", 
                                 f"make it and its folder writable, or {fix}") from None
        raise CifarflowError(f"cannot use the MLflow tracking store {db}: {type(exc).__name__}: "
                             f"{text.splitlines()[0] if text else ''}"[:400], fix) from None


_PROBE_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _check_server(uri: str) -> None:
    """One bounded request (2 retries, 10 s timeout: at most about 35 s) to the tracking server."""
    saved = {k: os.environ.get(k) for k in _PROBE_RETRIES}
    os.environ.update(_PROBE_RETRIES)
    try:
        mlflow.tracking.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        text = str(exc)
        code = getattr(exc, "error_code", "")
        # the status code, never a bare "401" anywhere in the text: a port such as 40127 holds one
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or re.search(r"error code 40[13]\b", text):
            raise CifarflowError(f"the MLflow tracking server {mask_url(uri)} refused the credentials",
                                 "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on it") \
                from None
        reason = ("connection refused" if "refused" in text.lower() else
                  "no answer in time" if "timed out" in text.lower() or "timeout" in text.lower() else
                  "unknown host" if "resolve" in text.lower() or "not known" in text.lower() else
                  f"{type(exc).__name__}")
        raise CifarflowError(f"cannot reach the MLflow tracking server {mask_url(uri)} ({reason})",
                             "start the server, or fix MLFLOW_TRACKING_URI") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def sqlite_lock(url: str):
    """Hold an exclusive inter-process lock next to the SQLite file of ``url``
    (``sqlite:///path``) while creating or migrating it; no-op for other URLs."""
    if not url.startswith("sqlite:///"):
        yield
        return
    db = Path(url.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(db.with_name(db.name + ".lock")):
        yield


def _create_sqlite_store_once(uri: str) -> None:
    """Create or migrate a SQLite store under :func:`sqlite_lock`.

    Two processes opening a new ``mlflow.db`` at once (two tuning workers)
    otherwise race in MLflow's schema migration (``table _alembic_tmp_runs
    already exists``).
    """
    chatter = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..."
    level = chatter.level
    with sqlite_lock(uri):
        chatter.setLevel(logging.WARNING)
        try:
            mlflow.tracking.MlflowClient(uri).search_experiments(max_results=1)
        finally:
            chatter.setLevel(level)


def experiment_name(recipe: str) -> str:
    """MLflow experiment of a recipe family: ``cifarflow/<recipe>``."""
    return f"cifarflow/{recipe}"


# What the tooling experiments hold, shown as their description on MLflow's experiments page.
TOOL_EXPERIMENTS = {
    "cifarflow/evaluation": "Runs of `cifarflow evaluate`: a logged or registered model scored on its test set "
                            "(accuracy, calibration, FGSM robustness); tag cifarflow.source_run_id names the training run.",
    "cifarflow/comparison": "Runs of `cifarflow compare`: the side-by-side table and plots of finished training runs.",
    "cifarflow/ensemble": "Runs of `cifarflow ensemble`: voting ensembles of logged models, scored like one model "
                          "and logged as a pyfunc model.",
    "cifarflow/export": "Runs of `cifarflow export`: ONNX and TFLite files of a registered version with their "
                        "parity figures against Keras.",
}


def use_experiment(name: str, description: str = "", tags: dict[str, str] | None = None):
    """Make experiment ``name`` the active one, creating it if needed, and return it.

    Unlike ``mlflow.set_experiment`` it prints no "Experiment ... does not exist"
    line. ``description`` (MLflow's ``mlflow.note.content``, the experiment page's
    description; :data:`TOOL_EXPERIMENTS` for the tooling ones) and ``tags``
    are set where the experiment does not have them yet. Two processes creating
    it at once both get the one experiment.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow.tracking.MlflowClient()
    wanted = {"mlflow.note.content": description or TOOL_EXPERIMENTS.get(name, ""), **(tags or {})}
    wanted = {k: v for k, v in wanted.items() if v}
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, tags=wanted)
        except MlflowException:  # created meanwhile by another process
            pass
        experiment = client.get_experiment_by_name(name)
    for key, value in wanted.items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return mlflow.set_experiment(experiment_id=experiment.experiment_id)


def use_recipe_experiment(config):
    """:func:`use_experiment` for ``config``'s recipe: ``cifarflow/<recipe>``, described by the recipe's
    ``description``, tagged ``cifarflow.recipe`` and ``cifarflow.model``."""
    about = (config.description.rstrip(".") + ". " if config.description else "") + \
        f"Training runs and tuning studies of recipe {config.recipe} (model {config.model})."
    return use_experiment(experiment_name(config.recipe), about,
                          {"cifarflow.recipe": config.recipe, "cifarflow.model": config.model})


def run_name(config, recipe: str | None = None) -> str:
    """``<recipe>-<params that differ from the recipe's defaults>``, e.g. ``wrn-epochs10-depth16-width4``:
    the one name rule of training runs, from the command line and the Python API alike.

    ``data`` and ``seed`` are left out, a path value is shortened to its file
    name's stem (``weights=/x/backbone.weights.h5`` -> ``weightsbackbone``);
    ``mlflow run`` passes every parameter explicitly, so only values that
    differ from the recipe file count.

    Args:
        config: the resolved ``TrainConfig``.
        recipe: the recipe name or file it was resolved from (``config.recipe`` when None).
    """
    from pathlib import PurePath

    from cifarflow import config as cfg

    try:
        defaults = cfg.resolve(recipe or config.recipe).params()
    except CifarflowError:  # resolved from a recipe file that is not in experiments/
        defaults = {}
    short = lambda v: PurePath(v).name.split(".")[0] if isinstance(v, str) and "/" in v else str(v)  # noqa: E731
    parts = [config.recipe] + [
        f"{k}{short(v)[:16]}" for k, v in config.params().items()
        if k not in ("data", "seed") and defaults.get(k) != v
    ]
    return "-".join(parts)


def run_description(config, data_name: str, images: dict[str, int], results: dict[str, float] | None = None) -> str:
    """The one-line description of a training run (MLflow's ``mlflow.note.content``, shown on the run page).

    ``<results> | <recipe> (<model>) on <data>: <n> train / <n> validation / <n> test images, <epochs> epochs
    of batch <b>, <optimizer> lr <lr> <schedule>. <recipe description>``; ``results`` (``test_accuracy``,
    ``best_val_accuracy``, ``train_seconds``) lead once the run has them.
    """
    first = ""
    if results:
        shown = [f"{k} {results[k]:.4f}" for k in ("test_accuracy", "best_val_accuracy") if k in results]
        if "train_seconds" in results:
            shown.append(f"train_seconds {results['train_seconds']:.0f}")
        first = " · ".join(shown) + " | "
    settings = (f"{config.recipe} ({config.model}) on {data_name}: {images['train']} train / {images['validation']} "
                f"validation / {images['test']} test images, {config.epochs} epochs of batch {config.batch_size}, "
                f"{config.optimizer} lr {config.learning_rate:g} {config.schedule}")
    return f"{first}{settings}." + (f" {config.description.rstrip('.')}." if config.description else "")


def log_dataset_inputs(data_name: str, source: str, sha256: str, images: dict[str, int]) -> None:
    """Log the splits of a run's data as MLflow dataset inputs (the runs table's Dataset column).

    One input per split in ``images`` (``train``, ``validation``, ``test``;
    empty splits skipped), named ``<data>-<split>``, with context = the split,
    source = the data's path or URL and digest = the dataset's sha256 (its
    first 36 hex digits, MLflow's limit). Inputs the run already has are kept.
    """
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path matches two registered source types; both are "local"
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        origin = resolve_dataset_source(source)
    for split, count in images.items():
        if count:
            mlflow.log_input(MetaDataset(origin, name=f"{data_name}-{split}", digest=sha256[:36]), context=split)


def system_metrics_wanted() -> bool:
    """Log MLflow system metrics (CPU, memory, GPU when ``nvidia-ml-py`` finds one) for training runs, unless
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says false; their start/stop messages stay out of the terminal."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0", "no")


def run_title(run_id: str | None = None) -> str:
    """``<run name> (run <first 8 hex of the id>)`` of ``run_id`` (the active run when None), for plot titles."""
    run = mlflow.get_run(run_id) if run_id else mlflow.active_run()
    if run is None:
        return ""
    name = run.info.run_name or mlflow.get_run(run.info.run_id).info.run_name
    return f"{name} (run {run.info.run_id[:8]})"


def git_commit() -> str:
    """HEAD commit of the code that runs (``-dirty`` if modified), or ``unknown``.

    The checkout holding the cifarflow package (an editable install) is asked
    first, then the working directory's (e.g. a copy launched by ``mlflow run``).
    """
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            run = lambda *args: subprocess.run(["git", *args], cwd=where, capture_output=True,  # noqa: E731
                                               text=True, timeout=10, check=True).stdout.strip()
            sha = run("rev-parse", "HEAD")
            return sha + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"


def host_cpu() -> str:
    """CPU model name and core count, e.g. ``Intel Xeon ... (2 cores)``."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def host_gpu() -> str:
    """Accelerators visible to the Keras backend, or ``none``."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return ", ".join(g.name for g in gpus) or "none"
        if backend == "jax":
            import jax

            devs = [d for d in jax.devices() if d.platform != "cpu"]
            return ", ".join(getattr(d, "device_kind", str(d)) for d in devs) or "none"
    except Exception:
        pass
    return "none"


def backend_version() -> dict[str, str]:
    """The version tag of the Keras backend's library: ``cifarflow.tf_version`` on TensorFlow,
    ``cifarflow.jax_version`` on JAX, ``cifarflow.torch_version`` on PyTorch (imports nothing else)."""
    backend = keras.backend.backend()
    module = BACKEND_MODULES.get(backend)
    if module is None:
        return {}
    import importlib

    return {f"cifarflow.{'tf' if backend == 'tensorflow' else backend}_version":
            importlib.import_module(module).__version__}


def run_tags(recipe: str, dataset_checksum: str) -> dict[str, str]:
    """The ``cifarflow.*`` tags of a training run (the backend library's version: :func:`backend_version`)."""
    return {
        "cifarflow.recipe": recipe,
        "cifarflow.dataset_sha256": dataset_checksum,
        "cifarflow.git_commit": git_commit(),
        "cifarflow.keras_backend": keras.backend.backend(),
        "cifarflow.keras_version": keras.__version__,
        **backend_version(),
        "cifarflow.host_cpu": host_cpu(),
        "cifarflow.host_gpu": host_gpu(),
    }


def _same_value(logged: str, value) -> bool:
    if logged == str(value):
        return True
    try:  # `mlflow run` logs a parameter shell-quoted when it needs quotes: "'[32,128,128]'"
        words = shlex.split(logged)
    except ValueError:
        words = []
    logged = words[0] if len(words) == 1 else logged
    parsed = parse_value(logged)
    if parsed == value or (isinstance(parsed, list) and isinstance(value, tuple) and tuple(parsed) == value):
        return True
    try:  # `mlflow run -P weight_decay=5e-4` logs "5e-4"; YAML reads that as a string
        return not isinstance(value, bool) and float(logged) == float(value)
    except (TypeError, ValueError):
        return False


def param_differences(run_id: str, params: dict) -> list[str]:
    """``key: logged -> new`` for each of ``params`` that run ``run_id`` logged with another value (reads only)."""
    logged = mlflow.tracking.MlflowClient().get_run(run_id).data.params
    return [f"{k}: {logged[k]} -> {v}" for k, v in params.items() if k in logged and not _same_value(logged[k], v)]


def log_params_once(run_id: str, params: dict) -> None:
    """Log the params the run does not have yet; check the ones it has.

    ``mlflow run`` logs an entry point's parameters as typed on the command
    line (``2``, ``null``) before the trainer logs the resolved ones (``2.0``,
    ``None``); MLflow forbids changing a logged value, so values already there
    are kept when they mean the same. A resumed run must use the same settings.

    Raises:
        CifarflowError: a logged param has a different value.
    """
    logged = mlflow.tracking.MlflowClient().get_run(run_id).data.params
    differ = [f"{k}: {logged[k]} -> {v}" for k, v in params.items() if k in logged and not _same_value(logged[k], v)]
    if differ:
        raise CifarflowError(
            f"run {run_id} was logged with other settings ({'; '.join(differ)})",
            "resume with the settings of the original run, or start a new run",
        )
    fresh = {k: v for k, v in params.items() if k not in logged}
    if fresh:
        mlflow.log_params(fresh)


class EpochLogger(keras.callbacks.Callback):
    """Logs the per-epoch metrics to the active MLflow run (step = epoch index): ``train_loss``,
    ``train_accuracy``, ``val_loss``, ``val_accuracy`` (with a validation split), ``lr``,
    ``epoch_seconds`` and ``images_per_second``.

    ``images_per_second`` counts training images over the training part of the
    epoch (validation excluded); ``epoch_seconds`` is the whole epoch.

    Args:
        train_images: images in one training epoch.
    """

    def __init__(self, train_images: int) -> None:
        super().__init__()
        self.train_images = train_images
        self._start = self._train_end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._train_end = 0.0
        self._lr = float(np.asarray(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    def on_test_begin(self, logs=None):
        if not self._train_end:
            self._train_end = time.perf_counter()

    def epoch_metrics(self, epoch, logs=None) -> dict[str, float]:
        """The metrics of the epoch ending now (also kept with its checkpoint, to be logged on resume if a
        kill came between the checkpoint and the log)."""
        logs = logs or {}
        end = time.perf_counter()
        train_seconds = (self._train_end or end) - self._start
        metrics = {
            "train_loss": logs.get("loss"),
            "train_accuracy": logs.get("accuracy"),
            "val_loss": logs.get("val_loss"),
            "val_accuracy": logs.get("val_accuracy"),
            "lr": self._lr,  # in effect at the epoch's first step
            "epoch_seconds": end - self._start,
            "images_per_second": self.train_images / max(train_seconds, 1e-9),
        }
        return {k: float(v) for k, v in metrics.items() if v is not None}

    def on_epoch_end(self, epoch, logs=None):
        mlflow.log_metrics(self.epoch_metrics(epoch, logs), step=epoch)


@contextlib.contextmanager
def logger_level(name: str, level: int):
    """Set logger ``name`` to ``level`` inside the block (to hold back a message known not to apply)."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


class _ServedKerasFlavor:
    """``mlflow.models.Model.log`` flavor: ``mlflow.keras``'s files and ``keras`` flavor, and
    :mod:`cifarflow.serving` as the pyfunc loader (copied into the model's ``code/``), with the class
    names as the pyfunc flavor's ``model_config``."""

    __name__ = "cifarflow.serving"

    @staticmethod
    def save_model(path, mlflow_model, keras_model, class_names, pip_requirements=None):
        import shutil

        from cifarflow import serving

        with logger_level("mlflow.keras.save", logging.ERROR):  # "without specifying model signature": on purpose
            mlflow.keras.save_model(keras_model, path, mlflow_model=mlflow_model, pip_requirements=pip_requirements)
        code = Path(path) / "code"
        code.mkdir(exist_ok=True)
        shutil.copyfile(serving.__file__, code / f"{serving.LOADER_MODULE}.py")
        pyfunc = mlflow_model.flavors["python_function"]
        pyfunc.update({"loader_module": serving.LOADER_MODULE, "code": "code",  # "config": MLflow's model_config
                       "config": {"class_names": [str(c) for c in class_names]}})
        mlflow_model.save(str(Path(path) / "MLmodel"))


def model_requirements() -> list[str]:
    """pip requirements of a logged model, pinned to this environment: mlflow, keras, numpy, pillow (the
    pyfunc decodes encoded images) and the backend."""
    import PIL

    pins = [f"mlflow=={mlflow.__version__}", f"keras=={keras.__version__}", f"numpy=={np.__version__}",
            f"pillow=={PIL.__version__}"]
    backend = keras.backend.backend()
    pins += [f"{backend}=={version}" for version in backend_version().values()]
    if backend == "jax":
        import jaxlib

        pins.append(f"jaxlib=={jaxlib.__version__}")
    return pins


def log_keras_model(model: keras.Model, class_names, name: str = "model"):
    """Log ``model`` as an MLflow LoggedModel: ``keras`` flavor plus the pyfunc of :mod:`cifarflow.serving`.

    ``mlflow.keras.load_model`` returns the Keras model as usual; the pyfunc
    (``mlflow models serve/predict``, ``mlflow.pyfunc.load_model``) predicts
    without progress output on raw pixels (N, 32, 32, 3) 0..255 (answering
    probabilities) or on a DataFrame column ``image`` of encoded JPEG/PNG images
    (answering ``label``, ``probability`` and one column per class name), and
    refuses bad input with HTTP 400 (:func:`cifarflow.serving.model_input`).

    No signature is logged: an MLflow signature is one schema (a pixel tensor or
    columns), and MLflow refuses, before the model sees it, any input that does
    not match it, so a signature would refuse one of the two inputs;
    ``docs/registry-and-deployment.md`` and the pulled ``model_card.json``
    describe both. Requirements are pinned to this environment
    (:func:`model_requirements`), not inferred (which loads the model once more).

    Args:
        model: the Keras model (raw 0..255 pixels in, softmax probabilities out).
        class_names: one name per output, recorded as the pyfunc flavor's
            ``model_config`` (``class_names``): the labels of image predictions.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/<model_id>``).
    """
    from mlflow.models import Model

    return Model.log(None, name=name, flavor=_ServedKerasFlavor, keras_model=model, class_names=list(class_names),
                     pip_requirements=model_requirements())
