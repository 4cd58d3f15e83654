"""The trainer: wires data, model, input pipeline, optimizer, callbacks and MLflow into one run."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np

from cifarflow import models, plots, tracking
from cifarflow.config import TrainConfig
from cifarflow.data import datasets, pipeline
from cifarflow.errors import CifarflowError
from cifarflow.evaluation import scoring
from cifarflow.evaluation.metrics import TTA_VIEWS
from cifarflow.training import checkpoints, distribute, optim, plans
from cifarflow.training.phases import TrainingPlan

log = logging.getLogger(__name__)  # progress lines; the CLI shows them beside the epoch lines


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced: its MLflow ids and final metrics."""

    run_id: str
    model_uri: str
    metrics: dict[str, float]


def checkpoint_root() -> Path:
    """Where in-progress runs keep their resume state: ``$CIFARFLOW_CHECKPOINTS`` or ``./checkpoints``."""
    return Path(os.environ.get("CIFARFLOW_CHECKPOINTS", "checkpoints"))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the Keras backend; make TensorFlow ops deterministic."""
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def sample_images(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """A seeded random sample of ``n`` images of ``x`` (all of them when ``n >= len(x)``), in order.

    Random rather than the first ``n``: an unshuffled training set (``val_fraction=0``)
    keeps the source's order, which may be sorted by class."""
    if n >= len(x):
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))]


def pixel_stats(x: np.ndarray, max_images: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..255 scale) of a random sample of up to ``max_images`` images of ``x`` (N, H, W, 3)."""
    sample = sample_images(x, max_images).reshape(-1, x.shape[-1]).astype(np.float64)
    return sample.mean(axis=0).tolist(), np.maximum(sample.std(axis=0), 1e-3).tolist()


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Optimizer with the recipe's schedule.

    ``cosine``: linear warmup from 0 to ``learning_rate`` over ``warmup_epochs``
    (or ``warmup_fraction`` of all steps), then cosine decay to ``min_learning_rate``
    at the last step (Loshchilov and Hutter 2017, SGDR, without restarts; Goyal et
    al. 2017 for the warmup). ``triangular``: :class:`~cifarflow.training.optim.Triangular`
    from ``warmup_start_fraction * learning_rate`` up to ``learning_rate`` at the end
    of the warmup, down to ``min_learning_rate`` at the last step (airbench94).
    Weight decay is decoupled (Keras' ``weight_decay`` argument). With
    ``lr_multipliers``, ``freeze_after_epochs`` or ``lookahead_steps`` the optimizer
    is the matching class of :mod:`cifarflow.training.optim`.
    """
    total = config.epochs * steps_per_epoch
    warmup_steps = (config.warmup_fraction * total if config.warmup_fraction is not None
                    else config.warmup_epochs * steps_per_epoch)
    warmup = min(int(round(warmup_steps)), total - 1)
    if config.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else config.learning_rate,
            decay_steps=max(1, total - warmup),
            alpha=config.min_learning_rate / config.learning_rate,
            warmup_target=config.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    elif config.schedule == "triangular":
        lr = optim.Triangular(config.learning_rate, total, warmup, start=config.warmup_start_fraction,
                              end=config.min_learning_rate / config.learning_rate)
    else:
        lr = config.learning_rate
    rules = {}
    if config.lr_multipliers:
        rules["lr_multipliers"] = config.lr_multipliers
    if config.freeze_after_epochs:
        rules["freeze_after"] = {k: int(round(v * steps_per_epoch)) for k, v in config.freeze_after_epochs.items()}
    if config.lookahead_steps:
        rules.update(lookahead_steps=config.lookahead_steps, lookahead_decay=config.lookahead_decay,
                     lookahead_total_steps=total)
    sgd, adamw, adam = ((optim.SGD, optim.AdamW, optim.Adam) if rules else
                        (keras.optimizers.SGD, keras.optimizers.AdamW, keras.optimizers.Adam))
    wd = config.weight_decay or None
    if config.optimizer == "sgd":
        return sgd(lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=wd, **rules)
    if config.optimizer == "adamw":
        return adamw(lr, weight_decay=config.weight_decay, **rules)
    return adam(lr, weight_decay=wd, **rules)


def make_callbacks(config: TrainConfig, *, train_images: int, checkpoint_dir: Path, has_validation: bool,
                   best_so_far: float | None = None, restore: bool = True,
                   phase: dict | None = None) -> list[keras.callbacks.Callback]:
    """The callbacks of a run, in order.

    ``EarlyStopping`` on ``val_accuracy`` when ``early_stopping_patience`` is
    set; ``ReduceLROnPlateau`` on ``val_loss`` (``loss`` without validation)
    when ``reduce_lr_patience`` is set; with a validation split,
    best-``val_accuracy`` weights to ``checkpoint_dir/best.weights.h5`` (above
    ``best_so_far`` when resuming; written atomically); crash-safe resume state
    under ``checkpoint_dir/backup``
    (:class:`~cifarflow.training.checkpoints.DurableBackup`, which keeps the first
    two's counters and the epoch's best file is already written when it commits);
    then MLflow per-epoch logging, so that an epoch is logged only once its
    checkpoint is durable. ``restore`` and ``phase`` go to the
    :class:`~cifarflow.training.checkpoints.DurableBackup`.
    """
    logger = tracking.EpochLogger(train_images)
    stateful: list[keras.callbacks.Callback] = []
    if config.early_stopping_patience:
        stateful.append(keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=config.early_stopping_patience))
    if config.reduce_lr_patience:
        stateful.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss" if has_validation else "loss",
            factor=config.reduce_lr_factor, patience=config.reduce_lr_patience))
    best = [checkpoints.AtomicModelCheckpoint(
        str(checkpoint_dir / "best.weights.h5"), monitor="val_accuracy", mode="max", save_best_only=True,
        save_weights_only=True, initial_value_threshold=best_so_far)] if has_validation else []
    backup = checkpoints.DurableBackup(checkpoint_dir / "backup", epoch_metrics=logger.epoch_metrics,
                                       restore=restore, phase=phase, stateful=stateful)
    return [*stateful, *best, backup, logger]


def compile_model(model: keras.Model, config: TrainConfig, steps_per_epoch: int) -> None:
    """Compile with ``config``'s optimizer and schedule, label-smoothed cross-entropy and accuracy."""
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )


def build_and_compile(config: TrainConfig, num_classes: int, x_train: np.ndarray) -> keras.Model:
    """The recipe's model, normalized with ``x_train``'s pixel statistics, initialised
    from ``data_init_images`` random training images when its builder has a
    data-dependent init (:func:`cifarflow.models.initialize`), and compiled with its
    optimizer, schedule (``ceil(len(x_train) / batch_size)`` steps per epoch),
    label-smoothed cross-entropy and accuracy."""
    mean, std = pixel_stats(x_train)
    model = models.build(config.model, num_classes=num_classes, mean=mean, std=std, **config.model_params)
    if config.model in models.DATA_INIT:
        models.initialize(config.model, model, sample_images(x_train, config.data_init_images, config.seed))
    compile_model(model, config, math.ceil(len(x_train) / config.batch_size))
    return model


def _metric_history(run_id: str, keys) -> dict[str, list[float]]:
    """Per-epoch values logged so far (last value per step), also across a resume."""
    client = mlflow.tracking.MlflowClient()
    out = {}
    for key in keys:
        by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
        out[key] = [by_step[s] for s in sorted(by_step)]
    return out


def _check_resumable(config: TrainConfig, resume: str, dataset_sha256: str) -> None:
    """Refuse a resume before anything is written: no resume state, no such run, or a run of another
    recipe, other data or other settings (the run stays as it was)."""
    if not (checkpoint_root() / resume / "backup" / checkpoints.STATE).is_file():
        raise CifarflowError(
            f"run {resume} has no resume state in {checkpoint_root().absolute() / resume / 'backup'} "
            "(finished runs keep none)",
            "resume from the directory the run started in (or set CIFARFLOW_CHECKPOINTS), or start a new run",
        )
    try:
        run = mlflow.tracking.MlflowClient().get_run(resume)
    except Exception as exc:
        raise CifarflowError(f"cannot resume run {resume}: {exc}".splitlines()[0],
                             "pass the run id printed when the run was interrupted") from None
    tags = run.data.tags
    differ = [f"{k}: {tags[k]} -> {v}" for k, v in (("cifarflow.recipe", config.recipe),
                                                   ("cifarflow.dataset_sha256", dataset_sha256))
              if k in tags and tags[k] != v] + tracking.param_differences(resume, config.params())
    if differ:
        raise CifarflowError(f"run {resume} was logged with other settings ({'; '.join(differ)})",
                             "resume with the recipe, data and settings of the original run, or start a new run")


def progress_verbosity() -> int:
    """Keras ``verbose`` for ``fit``: the live bar (1) on a terminal, else one plain line per epoch (2).

    Keras 3 treats every POSIX process as a terminal (``"posix" in sys.modules``),
    so piped output would otherwise fill with ANSI codes and carriage returns.
    """
    return 1 if sys.stdout.isatty() else 2


def _start_run(config: TrainConfig, run_name: str | None, resume: str | None):
    if resume:
        return mlflow.start_run(run_id=resume, log_system_metrics=tracking.system_metrics_wanted())
    run_name = run_name or tracking.run_name(config)
    if os.environ.get("MLFLOW_RUN_ID"):  # launched by `mlflow run`: use its run, with our name
        run = mlflow.start_run(log_system_metrics=tracking.system_metrics_wanted())
        mlflow.tracking.MlflowClient().update_run(run.info.run_id, name=run_name)
        return run
    tracking.use_recipe_experiment(config)
    return mlflow.start_run(run_name=run_name, log_system_metrics=tracking.system_metrics_wanted())


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Set the Keras global dtype policy for the ``with`` block and restore the previous one
    after it, also when the block raises.

    Args:
        precision: a Keras dtype policy name (``float32``, ``mixed_float16``, ``mixed_bfloat16``).

    Raises:
        ValueError: an unknown policy name (from Keras), before anything is changed.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def train(config: TrainConfig, *, quiet: bool = False, run_name: str | None = None,
          resume: str | None = None, in_active_run: bool = False,
          extra_callbacks: list[keras.callbacks.Callback] | None = None, log_model: bool = True,
          tags: dict[str, str] | None = None) -> TrainResult:
    """Train ``config`` end to end under its dtype ``precision``; see :func:`_train`.

    The Keras global dtype policy is set to ``config.precision`` (float32,
    mixed_float16 or mixed_bfloat16; the softmax layer stays float32) for the
    run and restored afterwards.
    """
    with dtype_policy(config.precision), contextlib.ExitStack() as placed:  # placed: the devices' scope
        return _train(config, placed, quiet=quiet, run_name=run_name, resume=resume, in_active_run=in_active_run,
                      extra_callbacks=extra_callbacks or [], log_model=log_model, tags=tags or {})


@dataclass(frozen=True)
class Splits:
    """A run's data: the dataset (its test split is scored once, at the end) and the
    seeded, stratified train/validation split of its training images (uint8 NHWC, int labels)."""

    ds: datasets.Dataset
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def load_splits(config: TrainConfig) -> Splits:
    """Load ``config.data`` (its ``classes``, at most ``limit`` training images per class) and split off
    ``val_fraction`` of the training images for validation, seeded by ``config.seed``.

    Raises:
        CifarflowError: bad data (see :func:`cifarflow.data.datasets.load`).
    """
    ds = datasets.select_classes(datasets.load(config.data, skip_corrupt=config.skip_corrupt, resize=config.resize,
                                                   trust_data=config.trust_data),
                                 config.classes)
    x_all, y_all = datasets.limit_per_class(ds.x_train, ds.y_train, config.limit, config.seed)
    return Splits(ds, *datasets.train_val_split(x_all, y_all, config.val_fraction, config.seed))


def training_data(config: TrainConfig, x: np.ndarray, y: np.ndarray, num_classes: int, multiple: int = 1,
                  shard: tuple[int, int] = (0, 1)):
    """The training batches of a recipe and the ``fit`` callbacks they need.

    Returns:
        ``(dataset, callbacks)``: :func:`cifarflow.data.pipeline.make_dataset` of
        ``x`` (uint8 (N, 32, 32, 3)) and ``y`` with the recipe's augmentation and
        mixing, shuffled with its seed; ``callbacks`` is the one callback it needs,
        its :class:`~cifarflow.data.pipeline.EpochClock` (every epoch's order and
        augmentation are a function of the seed and ``fit``'s epoch, so a resumed
        run sees the batches an uninterrupted one would). With ``flip="alternate"``
        the images are first mirrored by a
        :class:`~cifarflow.data.pipeline.AlternatingFlip`, which is then the clock. ``multiple``,
        ``shard``: see :func:`~cifarflow.data.pipeline.make_dataset`.
    """
    alternate = pipeline.AlternatingFlip(config.seed) if config.flip == "alternate" else None
    clock = alternate or pipeline.EpochClock()
    dataset = pipeline.make_dataset(
        alternate.prepare(x) if alternate else x, y, num_classes, config.batch_size, training=True, seed=config.seed,
        augment=pipeline.augmentation(config, seed=config.seed), mix=pipeline.mixing(config, seed=config.seed),
        alternate=alternate, clock=clock, multiple=multiple, shard=shard,
    )
    return dataset, [clock]


def input_pipelines(config: TrainConfig, splits: Splits, multiple: int = 1, shard: tuple[int, int] = (0, 1)):
    """``(train_ds, val_ds, callbacks)``: shuffled, augmented and mixed training batches and the callbacks
    they need (:func:`training_data`); validation batches (None without a validation split). Batches
    padded to a ``multiple`` of images where the devices need it (:mod:`cifarflow.training.distribute`)."""
    n = splits.ds.num_classes
    train_ds, callbacks = training_data(config, splits.x_train, splits.y_train, n, multiple, shard)
    val_ds = (pipeline.make_dataset(splits.x_val, splits.y_val, n, config.batch_size, training=False,
                                    multiple=multiple, shard=shard)
              if len(splits.y_val) else None)
    return train_ds, val_ds, callbacks


def _fit_plan(model: keras.Model, plan: TrainingPlan, config: TrainConfig, train_ds, val_ds, *, quiet: bool,
              train_images: int, checkpoint_dir: Path, best_so_far: float | None, extra_callbacks: list,
              state: dict | None = None) -> None:
    """Fit ``model`` phase after phase, each compiled with its optimizer and with its own callbacks.

    The epoch index (the metrics' step) counts on across phases; the best
    validation checkpoint is the best over all phases. With more than one
    phase (or one not called ``train``) the run gets the tags ``cifarflow.phase``
    (the phase in progress, then the last one) and ``cifarflow.phase_epochs``
    (``head:0-1,fine_tune:2-4``) and a per-epoch metric ``phase`` (1, 2, ...);
    ``trainable_param_count`` (and the counts ``phase.prepare`` returns) are logged
    at each phase's first epoch.

    ``state`` (a resumed run's :func:`~cifarflow.training.checkpoints.read_state`):
    the phases before the state's phase are skipped; that phase is prepared (its
    trainable flags and frozen BatchNorm), compiled with its optimizer and fitted
    from the state's epoch to its end, the weights and that phase's optimizer state
    restored when its ``fit`` begins (no epoch left at a phase boundary: only the
    restore); the later phases follow as usual.
    """
    epoch, spans = 0, []
    resume_phase = int(state.get("phase", 1)) if state else 0
    if state:
        epoch, spans = int(state.get("phase_start", 0)), list(state.get("spans", []))
        stopped = bool(state.get("stopped"))  # early stopping had ended the state's phase
    named = len(plan.phases) > 1 or plan.phases[0].name != "train"
    steps_per_epoch = math.ceil(train_images / config.batch_size)
    plan.before_fit(model, train_ds)
    first = True
    for index, phase in enumerate(plan.phases, start=1):
        if index < resume_phase:
            continue  # done before the kill: its spans come from the state
        counts = phase.prepare(model)
        compile_model(model, phase.config, steps_per_epoch)
        if named:
            mlflow.set_tag("cifarflow.phase", phase.name)
        if index != resume_phase:  # a resumed phase logged them when it began
            mlflow.log_metrics({"trainable_param_count": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
                                **counts}, step=epoch)
        callbacks = make_callbacks(config, train_images=train_images, checkpoint_dir=checkpoint_dir,
                                   has_validation=val_ds is not None, best_so_far=best_so_far,
                                   restore=first,  # a later phase goes on from the model in memory
                                   phase={"phase": index, "phase_start": epoch, "spans": spans})
        callbacks += list(extra_callbacks or [])
        start = int(state["epoch"]) if index == resume_phase else epoch
        stop = start if index == resume_phase and stopped else epoch + phase.epochs
        fitted = model.fit(train_ds, validation_data=val_ds, initial_epoch=start, epochs=stop,
                           callbacks=callbacks, shuffle=False, verbose=0 if quiet else progress_verbosity())  # the dataset shuffles, seeded
        first = False
        end = (fitted.epoch[-1] + 1) if fitted.epoch else start
        if named:
            spans = spans + [f"{phase.name}:{epoch}-{end - 1}"]
            logged = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(
                mlflow.active_run().info.run_id, "phase")}
            for e in range(epoch, end):
                if e not in logged:  # a resumed phase: also the epochs before the kill
                    mlflow.log_metric("phase", index, step=e)
        epoch = end
        best = [c.best for c in callbacks if isinstance(c, keras.callbacks.ModelCheckpoint)]
        best_so_far = float(best[0]) if best and best[0] is not None and math.isfinite(best[0]) else best_so_far
    if named:
        mlflow.set_tag("cifarflow.phase_epochs", ",".join(spans))


@contextlib.contextmanager
def _resumable(run_id: str, checkpoint_dir: Path, in_active_run: bool):
    """Training inside: Ctrl-C marks the run KILLED and names the ``--resume`` that continues it; a tuning
    trial (``in_active_run``) that stops for any reason leaves no resume state."""
    try:
        yield
    except KeyboardInterrupt:
        if in_active_run:  # a tuning trial: the study decides; a trial is never resumed
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise
        mlflow.end_run(status="KILLED")
        if not (checkpoint_dir / "backup").is_dir():
            raise CifarflowError(f"training interrupted before its first epoch ended; run {run_id} is KILLED",
                                 "start it again") from None
        raise CifarflowError(
            f"training interrupted; run {run_id} is saved up to its last finished epoch",
            f"continue it with the same command plus --resume {run_id}",
        ) from None
    except Exception:
        if in_active_run:  # a pruned or failed trial leaves nothing to resume
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        raise


def _restore_best(model: keras.Model, best_file: Path) -> None:
    """Load the best validation epoch's weights, when a validation split kept them."""
    if best_file.is_file():
        with warnings.catch_warnings():  # saved with another phase's optimizer: its state is not needed
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(str(best_file))


def _images(splits: Splits) -> dict[str, int]:
    return {"train": len(splits.y_train), "validation": len(splits.y_val), "test": len(splits.ds.y_test)}


def _data_name(config: TrainConfig, ds: datasets.Dataset) -> str:
    """The data's short name: its file or folder name without suffixes (``cifar10-jpeg``), else ``config.data``."""
    return Path(ds.source).name.split(".")[0] if ds.source else str(config.data)


def _log_inputs(config: TrainConfig, splits: Splits, model: keras.Model, run_id: str, tags: dict[str, str]) -> None:
    """Tags, the one-line description, params (resolved recipe and data sizes), the splits as MLflow dataset
    inputs, ``recipe.yaml``, ``param_count`` and ``skipped_corrupt_images``."""
    ds = splits.ds
    mlflow.set_tags({**tracking.run_tags(config.recipe, ds.checksum), **tags})
    tracking.log_params_once(run_id, {
        **config.params(),
        "data_source": ds.source,
        "train_images": len(splits.y_train), "val_images": len(splits.y_val), "test_images": len(ds.y_test),
        "num_classes": ds.num_classes, "tta_views": TTA_VIEWS[config.tta],
    })
    mlflow.set_tag("mlflow.note.content", tracking.run_description(config, _data_name(config, ds), _images(splits)))
    if not mlflow.get_run(run_id).inputs.dataset_inputs:  # a resumed run has them
        tracking.log_dataset_inputs(_data_name(config, ds), ds.source or str(config.data), ds.checksum,
                                    _images(splits))
    mlflow.log_text(config.to_yaml(), "recipe.yaml")
    mlflow.log_metrics({"skipped_corrupt_images": len(ds.skipped_files), "param_count": model.count_params()})


def _score_and_log(model: keras.Model, config: TrainConfig, splits: Splits, run_id: str,
                   train_seconds: float) -> dict[str, float]:
    """Score the trained model on the test split through :func:`cifarflow.evaluation.scoring.score` (as
    `cifarflow evaluate` does, without FGSM) and log its metrics and artifacts, ``train_seconds``,
    ``best_val_accuracy``, ``training_curves.png`` and ``classes.json``; the run's description then
    leads with the results. Returns the final metrics."""
    ds = splits.ds
    log.info("testing on %d images", len(ds.y_test))
    predict, _ = scoring.keras_functions(model)
    scored = scoring.score(ds, predict, None, tta=config.tta, fgsm_images=0)
    scoring.log_scored(scored, ds)
    extra = {"train_seconds": train_seconds}
    best_val = _metric_history(run_id, ["val_accuracy"])["val_accuracy"]
    if best_val:
        extra["best_val_accuracy"] = max(best_val)
    mlflow.log_metrics(extra)
    metrics = {**scored.metrics, **extra}
    mlflow.set_tag("mlflow.note.content",
                   tracking.run_description(config, _data_name(config, ds), _images(splits), metrics))
    curves = _metric_history(run_id, ["train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr"])
    with tempfile.TemporaryDirectory() as tmp:
        plots.training_curves(curves, Path(tmp) / "training_curves.png", title=tracking.run_title(run_id))
        (Path(tmp) / "classes.json").write_text(json.dumps(list(ds.class_names)))
        mlflow.log_artifacts(tmp)
    return metrics


def _train(config: TrainConfig, placed: contextlib.ExitStack, *, quiet: bool, run_name: str | None,
           resume: str | None, in_active_run: bool, extra_callbacks: list, log_model: bool,
           tags: dict[str, str]) -> TrainResult:
    """Train ``config`` end to end and record everything in one MLflow run.

    Loads and splits the data (seeded, stratified validation split; the test
    split is used once, at the end), builds the model, fits its training plan
    (:mod:`cifarflow.training.phases`) with the recipe's optimizer, schedule and
    callbacks, keeps the weights of the best validation epoch, scores them on the
    test split (:func:`cifarflow.evaluation.scoring.score`: ``test_loss`` is the
    test negative log-likelihood) and logs params, tags, per-epoch and final
    metrics, plots, reports and the model to MLflow.

    A killed or interrupted run keeps its state under :func:`checkpoint_root`;
    ``resume=<run_id>`` continues it from the last finished epoch (and its phase)
    in the same MLflow run, with the weights, optimizer state, schedule position,
    seed states and data order of that epoch: on the TensorFlow CPU backend it ends
    with the metrics the uninterrupted run would have had.

    With ``distribution`` data parallel (:mod:`cifarflow.training.distribute`) the model is built,
    compiled and fitted in the devices' scope, entered on ``placed`` and closed before scoring;
    scoring and the logged model use one device.

    Args:
        config: the resolved recipe.
        placed: holds the devices' scope; the caller closes it also when this raises.
        quiet: no progress bar.
        run_name: MLflow run name; :func:`cifarflow.tracking.run_name` when None (as the CLI names it).
        resume: id of an interrupted run to continue.
        in_active_run: log into the active MLflow run (e.g. a tuning trial's
            nested run) and leave it open, instead of starting a run.
        extra_callbacks: more Keras callbacks (e.g. a pruning callback);
            exceptions they raise propagate after the run is marked.
        log_model: log the trained model (tuning trials skip it).
        tags: more tags for the run.

    Returns:
        :class:`TrainResult` with the run id, the ``models:/<model_id>`` URI
        and the final metrics.

    Raises:
        CifarflowError: bad data, or a run that cannot be resumed; also on
            Ctrl-C, naming the run id to resume.
    """
    plan = plans.plan(config)
    if distribute.join_processes()[1] > 1 and resume:  # before MLflow: other processes record elsewhere
        raise CifarflowError("--resume of a run over several processes is not supported",
                             "resume it as one process (distribution=auto), or start a new run")
    tracking.configure()
    seed_everything(config.seed)
    log.info("loading data %s", config.data)
    splits = load_splits(config)
    place = distribute.placement(config)
    placed.enter_context(place.scope())  # build, compile and fit on the devices; closed before scoring
    model = place.adapt(build_and_compile(config, splits.ds.num_classes, splits.x_train))
    train_ds, val_ds, data_callbacks = input_pipelines(config, splits, place.batch_multiple, place.process)

    if resume:
        _check_resumable(config, resume, splits.ds.checksum)
    runs = contextlib.nullcontext(mlflow.active_run()) if in_active_run else _start_run(config, run_name, resume)
    with runs as run:
        run_id = run.info.run_id
        ckpt_dir = checkpoint_root() / run_id
        state = checkpoints.read_state(ckpt_dir / "backup") if resume else None
        _log_inputs(config, splits, model, run_id, {**plan.tags(model), "cifarflow.distribution": place.tag, **tags})
        if state and state["metrics"]["values"]:  # killed after the checkpoint, before the epoch's MLflow log
            step = state["metrics"]["step"]
            if step not in {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "train_loss")}:
                mlflow.log_metrics(state["metrics"]["values"], step=step)
        best_so_far = max(_metric_history(run_id, ["val_accuracy"])["val_accuracy"], default=None) if resume else None
        started = time.perf_counter() - (state["train_seconds"] if state else 0.0)  # train_seconds sums segments
        with _resumable(run_id, ckpt_dir, in_active_run):
            _fit_plan(model, plan, config, train_ds, val_ds, quiet=quiet, train_images=len(splits.y_train),
                      checkpoint_dir=ckpt_dir, best_so_far=best_so_far,
                      extra_callbacks=data_callbacks + extra_callbacks, state=state)
        train_seconds = time.perf_counter() - started
        _restore_best(model, ckpt_dir / "best.weights.h5")
        placed.close()
        model = place.single_device(model, lambda: build_and_compile(config, splits.ds.num_classes, splits.x_train))
        plan.after_fit(model, run_id)

        metrics = _score_and_log(model, config, splits, run_id, train_seconds)
        model_uri = ""
        if log_model:
            log.info("logging the model to MLflow")
            plain = optim.portable(model.optimizer)
            if plain is not model.optimizer:  # the saved model must load with plain Keras (serving, export)
                model.compile(optimizer=plain, loss=model.loss, metrics=["accuracy"])
            model_uri = tracking.log_keras_model(model, splits.ds.class_names).model_uri
            mlflow.set_tag("cifarflow.model_uri", model_uri)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return TrainResult(run_id=run_id, model_uri=model_uri, metrics=metrics)
