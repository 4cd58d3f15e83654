"""Hyperparameter search: Optuna studies over recipe settings, each trial a nested MLflow run."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import mlflow
import optuna
import pydantic
import yaml

from cifarflow import config as cfg
from cifarflow import plots, tracking
from cifarflow.errors import CifarflowError

DEFAULT_STORAGE = "sqlite:///optuna.db"
RUN_ID_ATTR = "mlflow_run_id"  # where optuna_integration's MLflowCallback keeps a trial's run id
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the study's MLflow parent run, shared by its workers
_TAKEN = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)


class Param(pydantic.BaseModel):
    """One searched setting: ``float``/``int`` in [low, high] (``log`` for log-uniform) or ``categorical``."""

    model_config = pydantic.ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @pydantic.model_validator(mode="after")
    def _check(self) -> "Param":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        if self.log and self.step:
            raise ValueError("use either log or step, not both")
        return self

    def describe(self) -> str:
        """One line for the study run's params: ``float 0.01..0.3 log``, ``categorical [0.25, 0.5]``."""
        if self.type == "categorical":
            return f"categorical {list(self.choices)}"
        return f"{self.type} {self.low:g}..{self.high:g}" + (" log" if self.log else "") + \
            (f" step {self.step:g}" if self.step else "")

    def values_to_check(self) -> list[Any]:
        """Values that must all be valid recipe settings: the ends, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


class Pruner(pydantic.BaseModel):
    """Pruner of the study: ``median`` (default: 2 startup trials, 1 warm-up epoch), ``hyperband`` or ``none``."""

    model_config = pydantic.ConfigDict(extra="forbid")
    type: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = pydantic.Field(2, ge=0)
    n_warmup_steps: int = pydantic.Field(1, ge=0)
    min_resource: int = pydantic.Field(1, ge=1)
    reduction_factor: int = pydantic.Field(3, ge=2)

    def describe(self) -> str:
        """``MedianPruner(n_startup_trials=2, n_warmup_steps=1)``, ``HyperbandPruner(...)`` or ``NopPruner()``."""
        fields = {"median": ("n_startup_trials", "n_warmup_steps"), "hyperband": ("min_resource", "reduction_factor")}
        args = ", ".join(f"{k}={getattr(self, k)}" for k in fields.get(self.type, ()))
        return f"{type(self.build()).__name__}({args})"

    def build(self) -> optuna.pruners.BasePruner:
        if self.type == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.n_startup_trials,
                                               n_warmup_steps=self.n_warmup_steps)
        if self.type == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=self.min_resource,
                                                  reduction_factor=self.reduction_factor)
        return optuna.pruners.NopPruner()


class SearchSpace(pydantic.BaseModel):
    """A search file ``experiments/search/<family>.yaml``.

    ``recipes`` lists the recipes it applies to; ``params`` maps recipe or
    model settings to their ranges; ``enqueue`` lists known settings tried
    first (``study.enqueue_trial``); ``seed`` seeds the TPE sampler.
    """

    model_config = pydantic.ConfigDict(extra="forbid")
    recipes: list[str] = []
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    pruner: Pruner = Pruner()
    params: dict[str, Param]
    enqueue: list[dict[str, Any]] = []
    seed: int | None = None

    @property
    def direction(self) -> str:
        return "maximize" if self.metric == "val_accuracy" else "minimize"

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's values for every searched setting."""
        out = {}
        for name, p in self.params.items():
            if p.type == "categorical":
                out[name] = trial.suggest_categorical(name, p.choices)
            elif p.type == "int":
                out[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                out[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
        return out


def search_dir() -> Path:
    """The folder of search files: ``search/`` inside :func:`cifarflow.config.recipes_dir`."""
    return cfg.recipes_dir() / "search"


def find_space(recipe: str) -> Path:
    """The search file that lists ``recipe`` (or is named after it).

    Raises:
        CifarflowError: no search file covers the recipe.
    """
    named = search_dir() / f"{recipe}.yaml"
    if named.is_file():
        return named
    for path in sorted(search_dir().glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        if recipe in (raw.get("recipes") or []):
            return path
    raise CifarflowError(f"no search space lists recipe '{recipe}' in {search_dir()}",
                         "add it to a search file's 'recipes:' or pass --space PATH")


def load_space(path: str | os.PathLike, recipe: str) -> SearchSpace:
    """Read and validate a search file against ``recipe``.

    Every searched name must be a setting of the recipe (training setting or
    model parameter) and every range end / choice a valid value for it.

    Raises:
        CifarflowError: missing file, invalid YAML, bad ranges, unknown params
            or values the recipe refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise CifarflowError(f"search space {path} not found", "pass --space with an existing .yaml file")
    try:
        space = SearchSpace(**(yaml.safe_load(path.read_text()) or {}))
    except yaml.YAMLError as exc:
        raise CifarflowError(f"invalid YAML in {path}: {exc}", "fix the search file") from None
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise CifarflowError(f"bad search space {path}: {where}: {err['msg']}", "fix the search file") from None
    for name, p in space.params.items():
        for value in p.values_to_check():
            try:
                cfg.resolve(recipe, {name: value})
            except CifarflowError as exc:
                raise CifarflowError(f"search space {path.name}, param '{name}' = {value!r}: {exc.problem}",
                                     exc.fix) from None
    for i, fixed in enumerate(space.enqueue):
        unknown = sorted(set(fixed) - set(space.params))
        if unknown:
            raise CifarflowError(f"search space {path.name}: enqueue[{i}] sets {unknown}, which are not searched",
                                 f"use only: {', '.join(space.params)}")
    return space


def open_storage(url: str, heartbeat: int = 60) -> optuna.storages.RDBStorage:
    """Optuna RDB storage at ``url`` (any SQLAlchemy URL) with trial heartbeats.

    A trial whose process died stops beating; after ``2 * heartbeat`` seconds
    the next worker marks it FAIL and :func:`_end_stale_run` ends its MLflow run
    as FAILED.

    Creating the tables races with any other process creating them at the same moment: workers on
    one SQLite file take a file lock, but a process without it (``optuna.load_study``, the Optuna
    dashboard, a worker on another machine sharing PostgreSQL) can still create a table first, and
    the loser's ``CREATE TABLE`` or version row fails ("already exists", unique constraint). Such a
    failure is retried (up to 5 tries, 0.5-2 s apart): the tables are there then.

    Raises:
        CifarflowError: the storage cannot be opened (unreachable, not a database, refused...).
    """
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 15}  # an unreachable host fails in seconds, not minutes
    attempt, tries = 0, 5
    while True:
        attempt += 1
        try:
            # the lock: two fresh workers would race creating the tables
            with tracking.sqlite_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: used on purpose
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                                  grace_period=2 * heartbeat,
                                                  heartbeat_stale_trial_callback=_end_stale_run)
        except Exception as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""]
            if attempt < tries and _lost_a_creation_race(reason[0]):
                time.sleep(0.5 * attempt)
                continue
            raise CifarflowError(f"cannot open Optuna storage {tracking.mask_url(url)}: {type(exc).__name__}: "
                                 f"{tracking.mask_secrets(reason[0], url)}"[:500],
                                 "pass --storage with a reachable SQLAlchemy URL, e.g. sqlite:///optuna.db") from None


def _lost_a_creation_race(reason: str) -> bool:
    """Whether a database error says another process created the same table or version row first."""
    reason = reason.lower()
    return "already exists" in reason or "unique constraint" in reason or "duplicate key" in reason


@contextlib.contextmanager
def study_lock(url: str, study_name: str):
    """Hold an exclusive lock over ``study_name`` that every worker on ``url`` respects.

    A file lock beside a SQLite storage (:func:`cifarflow.tracking.sqlite_lock`),
    a session advisory lock on PostgreSQL (``pg_advisory_lock``), a named lock
    on MySQL/MariaDB (``GET_LOCK``); no lock for other databases. Held only
    for short bookkeeping (taking a trial, failing stale ones, creating the
    parent run), never while a trial trains.
    """
    backend = url.split(":", 1)[0].split("+", 1)[0]
    if backend == "sqlite":
        with tracking.sqlite_lock(url):
            yield
        return
    if backend not in ("postgresql", "mysql", "mariadb"):
        yield
        return
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"cifarflow.study:{study_name}".encode()).digest()[:8], "big", signed=True)
    take, give = (("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)") if backend == "postgresql" else
                  ("SELECT GET_LOCK(CONCAT('cifarflow.', :k), -1)", "SELECT RELEASE_LOCK(CONCAT('cifarflow.', :k))"))
    with _lock_engine(url).connect() as conn:  # a session lock: also released if this process dies
        conn.execute(sqlalchemy.text(take), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text(give), {"k": key})


@functools.lru_cache(maxsize=4)
def _lock_engine(url: str):
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    return sqlalchemy.create_engine(url, poolclass=NullPool)


def _fail_stale_trials(study: optuna.Study) -> None:
    """Mark trials whose heartbeat stopped more than the grace period ago FAIL (their MLflow runs FAILED)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class _BudgetMet(Exception):
    """The study already holds its budget of complete, pruned and running trials."""


def _take_trials_within_budget(study: optuna.Study, trials: int, lock) -> None:
    """Make ``study.ask`` (which ``study.optimize`` calls for every trial) take a trial only while
    the study holds fewer than ``trials`` complete, pruned or running ones, deciding under ``lock``,
    so that any number of parallel workers hold the budget exactly; otherwise it raises
    :class:`_BudgetMet`. Stale trials are failed first, which frees their places."""
    ask = study.ask

    def ask_within_budget(*args, **kwargs):
        with lock():
            _fail_stale_trials(study)
            if len(study.get_trials(deepcopy=False, states=_TAKEN)) >= trials:
                raise _BudgetMet
            return ask(*args, **kwargs)

    study.ask = ask_within_budget


def _end_stale_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    run_id = trial.system_attrs.get(RUN_ID_ATTR)
    if run_id:
        client = mlflow.tracking.MlflowClient()
        client.set_tag(run_id, "state", "FAIL")
        client.set_terminated(run_id, "FAILED")


_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def _finish_trial_run(recipe: str):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """After MLflowCallback logged value, params and state: readable name and a terminal status."""
        run_id = trial.system_attrs.get(RUN_ID_ATTR)
        if run_id:
            client = mlflow.tracking.MlflowClient()
            client.update_run(run_id, name=f"{recipe}-{study.study_name}-trial{trial.number}")
            client.set_terminated(run_id, _STATUS.get(trial.state.name, "FAILED"))
    return callback


def _stop_after_failures(limit: int):
    failures = []

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Stop this worker after ``limit`` failed trials: a broken setting must not loop forever."""
        if trial.state == optuna.trial.TrialState.FAIL:
            failures.append(trial.number)
            if len(failures) >= limit:
                study.stop()
    return callback


def _parent_run(study: optuna.Study, experiment_id: str, recipe: str) -> str:
    """The study's MLflow parent run, made by its first worker; call under :func:`study_lock`, so that
    workers starting at once share one. Its id is kept in the study (``PARENT_RUN_ATTR``); a study
    from before that is found by its tags."""
    client = mlflow.tracking.MlflowClient()
    known = study.user_attrs.get(PARENT_RUN_ATTR)
    if known:
        try:
            run = client.get_run(known)
            if run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active":
                return known
        except mlflow.exceptions.MlflowException:  # another tracking store, or deleted
            pass
    runs = mlflow.search_runs(
        [experiment_id], output_format="list",
        filter_string=f"tags.`cifarflow.study` = '{study.study_name}' and tags.`cifarflow.role` = 'study'",
    )
    run_id = runs[0].info.run_id if runs else client.create_run(
        experiment_id, run_name=f"{recipe}-study-{study.study_name}",
        tags={"cifarflow.study": study.study_name, "cifarflow.role": "study"}).info.run_id
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return run_id


def _importances_plot(study: optuna.Study, metric: str, path: Path, title: str) -> None:
    """Optuna's parameter-importance bars, with ``metric`` in the legend and ``title`` on top. Optuna's plot
    switches the process to matplotlib's ggplot style (``plt.style.use``); the process's style is restored after
    it, so the plots drawn later in the process (``--retrain-best``'s, another study's) keep their look."""
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_param_importances

    with plt.rc_context(), warnings.catch_warnings():
        # "Parameter importances will be equal" on few or tied trials: the plot says so
        warnings.filterwarnings("ignore", category=UserWarning, module=r"optuna\.importance")
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the matplotlib backend
        ax = plot_param_importances(study, target_name=metric)
        ax.set_title("", loc="left")  # Optuna's own "Hyperparameter Importances"
        ax.set_title(f"parameter importances: {title}")
        ax.set_xlabel(f"importance for {metric}")
        fig = ax.figure
        fig.set_size_inches(8, 4.8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _log_plots(study: optuna.Study, metric: str, recipe: str) -> None:
    """``optuna/optimization_history.png``, ``parallel_coordinate.png`` and (two complete trials or more)
    ``param_importances.png`` in the active run, titled with the study."""
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    title = f"study {study.study_name} ({recipe}, {complete} complete trials)"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plots.optimization_history(study, metric, out / "optimization_history.png", title=title)
        plots.parallel_coordinate(study, metric, out / "parallel_coordinate.png", title=title)
        if complete >= 2:
            try:
                _importances_plot(study, metric, out / "param_importances.png", title)
            except Exception as exc:  # e.g. every trial with the same params
                mlflow.set_tag("cifarflow.plot_skipped.param_importances", str(exc)[:200])
        mlflow.log_artifacts(tmp, "optuna")


def _trial_line(trial: optuna.trial.FrozenTrial, metric: str) -> str:
    """``trial 3 COMPLETE val_accuracy=0.6120 dropout=0.21 learning_rate=0.0412 run <id>``: one finished trial."""
    if trial.value is not None:
        value = f"{metric}={trial.value:.4f}"
    elif trial.intermediate_values:
        step = max(trial.intermediate_values)
        value = f"{metric}={trial.intermediate_values[step]:.4f} (epoch {step + 1})"
    else:
        value = f"{metric}=none"
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    run_id = trial.user_attrs.get(RUN_ID_ATTR) or trial.system_attrs.get(RUN_ID_ATTR, "?")
    return f"trial {trial.number} {trial.state.name} {value} {params} run {run_id}"


def _report_trials(metric: str, report):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Tell the user about each finished trial: number, state, value, params, MLflow run."""
        report(_trial_line(trial, metric))
    return callback


class _DropRetracingWarnings(logging.Filter):
    """Drops TensorFlow's "N out of the last N calls ... triggered tf.function retracing" warning: a study builds
    a new model for every trial by design, and each one's first predict traces anew."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def study_params(recipe: str, trials: int, storage: str, metric: str, space: "SearchSpace", space_file: str,
                 config: cfg.TrainConfig, overrides: dict) -> dict[str, Any]:
    """The settings of a study as the params of its MLflow run (storage credentials masked).

    Keys: ``recipe``, ``trials``, ``metric``, ``direction``, ``sampler``,
    ``pruner``, ``storage``, ``search_space`` (file name), ``epochs``,
    ``limit``, ``data`` (of every trial), ``fixed.<name>`` (other fixed
    overrides) and ``space.<name>`` (each searched range, :meth:`Param.describe`).
    """
    return {
        "recipe": recipe, "trials": trials, "metric": metric, "direction": space.direction,
        "sampler": f"TPESampler(seed={space.seed})", "pruner": space.pruner.describe(),
        "storage": tracking.mask_url(storage), "search_space": space_file,
        "epochs": config.epochs, "limit": config.limit, "data": config.data,
        **{f"fixed.{k}": v for k, v in overrides.items() if k not in ("epochs", "limit", "data")},
        **{f"space.{name}": p.describe() for name, p in space.params.items()},
    }


def tune(recipe: str, study_name: str, trials: int, *, overrides: dict | None = None,
         storage: str = DEFAULT_STORAGE, space_path: str | None = None, timeout: float | None = None,
         n_jobs: int = 1, quiet: bool = True, heartbeat: int = 60, metric: str | None = None,
         retrain_best: bool = False, report=None) -> optuna.Study:
    """Run (or continue) an Optuna study over ``recipe``.

    The study lives in ``storage`` under ``study_name`` (``load_if_exists``), so
    workers on several machines sharing one database join the same study and a
    killed process resumes by running the same command. The budget is exact: a
    worker takes a trial only while the study holds fewer than ``trials``
    complete, pruned or running trials (decided under :func:`study_lock`). A
    killed worker's trial stops beating and, two heartbeats later, is failed
    (its MLflow run FAILED) by the next worker to look (stale trials are failed
    when a worker starts, before each trial and while it waits); a worker leaves
    only when the budget is met and no trial is running, so none is left
    RUNNING and a failed one's place is filled.
    The study names its objective (``set_metric_names``), holds its MLflow parent
    run id (user attribute ``mlflow_parent_run_id``) and each trial its run id
    (user attribute ``mlflow_run_id``); the parent run holds the study's settings
    as params (:func:`study_params`) and its name as tag ``cifarflow.study``.

    Each trial trains the recipe with its params (plus ``overrides``) in a
    nested MLflow run under the study's parent run, reports the search file's
    metric every epoch to the pruner (``KerasPruningCallback``) and returns the
    best value of it over the epochs: never the test accuracy. The parent run
    gets the best params and value, the storage URL and the Optuna plots.

    Args:
        recipe: recipe name.
        study_name: the Optuna study (and MLflow parent run) name.
        trials: complete + pruned trials the study should hold.
        overrides: fixed settings for every trial (``--epochs``, ``--limit``, ``--set``...).
        storage: SQLAlchemy URL of the Optuna storage.
        space_path: search file; found by recipe in ``experiments/search/`` when None.
        timeout: stop starting trials after this many seconds.
        n_jobs: threads of this process running trials; MLflowCallback serialises
            the trials' runs, so use several processes (workers) for parallelism.
        quiet: no progress bars.
        heartbeat: seconds between trial heartbeats (stale after twice that).
        metric: ``val_accuracy`` or ``val_loss``, overriding the search file's.
        retrain_best: afterwards train the best params on train+val (all of it: not
            ``limit``) with the recipe's full epochs and evaluate on test (a normal run tagged
            ``cifarflow.study``).
        report: called with one line per finished trial (:func:`_trial_line`), e.g. ``print``.

    Returns:
        The ``optuna.Study``.

    Raises:
        CifarflowError: bad recipe, search file, overrides or storage.
    """
    from optuna_integration import KerasPruningCallback, MLflowCallback

    from cifarflow.training.trainer import train

    overrides = dict(overrides or {})
    base = cfg.resolve(recipe, overrides)  # fail fast on bad fixed settings
    space_path = Path(space_path or find_space(recipe))
    space = load_space(space_path, recipe)
    if metric:
        space = space.model_copy(update={"metric": metric})
    tracking.configure()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # MLflowCallback.track_in_mlflow and the matplotlib plots are marked experimental
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # deprecated in optuna-integration 4.9 (callbacks move to OptunaHub, no replacement published
    # yet); kept on the pinned 5.0.0, removed in 6.0
    warnings.filterwarnings("ignore", message="MLflowCallback has been deprecated", category=FutureWarning)
    tf_logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _DropRetracingWarnings) for f in tf_logger.filters):
        tf_logger.addFilter(_DropRetracingWarnings())
    study = optuna.create_study(
        study_name=study_name, storage=open_storage(storage, heartbeat), load_if_exists=True,
        direction=space.direction, pruner=space.pruner.build(), sampler=optuna.samplers.TPESampler(seed=space.seed),
    )
    lock = functools.partial(study_lock, storage, study_name)
    identity = {"recipe": recipe, "metric": space.metric}
    experiment = tracking.use_recipe_experiment(base)
    with lock():
        _fail_stale_trials(study)  # a worker killed before this one started
        if not study.trials and not study.user_attrs:
            for key, value in identity.items():
                study.set_user_attr(key, value)
            for fixed in space.enqueue:
                study.enqueue_trial(fixed)
        known = {k: study.user_attrs.get(k) for k in identity}
        if known != identity or study.direction.name.lower() != space.direction:
            raise CifarflowError(f"study '{study_name}' in {tracking.mask_url(storage)} searches {known} "
                                 f"({study.direction.name.lower()}), not {identity}",
                                 "use another --study name, or the study's recipe and metric")
        parent_id = _parent_run(study, experiment.experiment_id, recipe)

    with mlflow.start_run(run_id=parent_id) as parent:
        mlflow.set_tags({"cifarflow.study": study_name, "cifarflow.role": "study", "cifarflow.recipe": recipe,
                         "cifarflow.optuna_storage": tracking.mask_url(storage),
                         "cifarflow.search_space": space_path.name})
        mlflow.log_text(space_path.read_text(), "search_space.yaml")
        params = study_params(recipe, trials, storage, space.metric, space, space_path.name, base, overrides)
        logged = mlflow.get_run(parent.info.run_id).data.params  # a re-run of the study keeps the first settings
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        mlflow.set_tag("mlflow.note.content",
                       f"Optuna study {study_name}: {recipe} searched over {', '.join(space.params)} for the best "
                       f"{space.metric} ({space.direction}), {trials} trials of {base.epochs} epochs; "
                       f"each trial is a nested run, the study lives in {tracking.mask_url(storage)}.")
        study.set_metric_names([space.metric])
        mlflow_cb = MLflowCallback(metric_name=f"best_{space.metric}", create_experiment=False,
                                   mlflow_kwargs={"nested": True},
                                   tag_trial_user_attrs=False)  # its user attrs name the run itself

        @mlflow_cb.track_in_mlflow()
        def objective(trial: optuna.Trial) -> float:
            worker = f"{socket.gethostname()}:{os.getpid()}"  # which machine and process runs the trial
            trial.set_user_attr("worker", worker)
            mlflow.set_tags({"mlflow.parentRunId": parent.info.run_id, "cifarflow.study": study_name,
                             "cifarflow.trial": str(trial.number), "cifarflow.worker": worker})
            trial.set_user_attr(RUN_ID_ATTR, mlflow.active_run().info.run_id)  # optuna-dashboard shows it
            config = cfg.resolve(recipe, {**overrides, **space.suggest(trial)})
            train(config, quiet=quiet, in_active_run=True, log_model=False,
                  extra_callbacks=[KerasPruningCallback(trial, space.metric)])
            values = mlflow.tracking.MlflowClient().get_metric_history(mlflow.active_run().info.run_id, space.metric)
            best = (max if space.direction == "maximize" else min)(m.value for m in values)
            return float(best)

        _take_trials_within_budget(study, trials, lock)
        callbacks = [mlflow_cb, _finish_trial_run(recipe), _stop_after_failures(max(3, trials))] + \
            ([_report_trials(space.metric, report)] if report else [])
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            try:
                study.optimize(objective, n_trials=None, n_jobs=n_jobs, catch=(Exception,), callbacks=callbacks,
                               timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                break  # timed out, or stopped after repeated failures
            except _BudgetMet:
                pass
            with lock():  # the budget is taken: wait while trials run, in case one goes stale or fails
                _fail_stale_trials(study)
                running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if not running:
                break
            time.sleep(1.0)  # a stale trial is failed and rerun within a second of going stale
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        states = [t.state.name for t in study.trials]
        mlflow.log_metrics({"trials_complete": states.count("COMPLETE"), "trials_pruned": states.count("PRUNED"),
                            "trials_failed": states.count("FAIL")})
        if done:
            mlflow.log_metric(f"best_{space.metric}", study.best_value)
            # rounded for the runs table; full precision in the best trial's run and in Optuna
            mlflow.set_tags({f"best.{k}": f"{v:.4g}" if isinstance(v, float) else str(v)
                             for k, v in study.best_params.items()})
            mlflow.set_tag("cifarflow.best_trial", str(study.best_trial.number))
            _log_plots(study, space.metric, recipe)
    if retrain_best and done:
        full = {**overrides, **study.best_params, "val_fraction": 0.0, "early_stopping_patience": None}
        full.pop("epochs", None)  # the recipe's full epochs
        full.pop("limit", None)  # and all the training images: --limit sizes the trials only
        train(cfg.resolve(recipe, full), quiet=quiet, run_name=f"{recipe}-best-of-{study_name}",
              tags={"cifarflow.study": study_name, "cifarflow.role": "retrain-best"})
    return study
