"""Optimizer schedule (warmup then cosine) and the callbacks each recipe option switches on."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cifarflow import config
from cifarflow.training.trainer import make_callbacks, make_optimizer


def lr_at(optimizer, step):
    return float(np.asarray(optimizer._learning_rate(step)))


def test_linear_warmup_then_cosine_decay_to_the_minimum():
    cfg = config.resolve("cnn", {"epochs": 10, "learning_rate": 0.2, "warmup_epochs": 2, "min_learning_rate": 0.002})
    opt = make_optimizer(cfg, steps_per_epoch=100)
    assert isinstance(opt, keras.optimizers.SGD) and opt.nesterov and opt.momentum == 0.9
    assert opt.weight_decay == pytest.approx(5e-4)
    assert lr_at(opt, 0) == pytest.approx(0.0)
    assert lr_at(opt, 100) == pytest.approx(0.1, rel=1e-4)       # half-way through warmup
    assert lr_at(opt, 200) == pytest.approx(0.2, rel=1e-4)       # peak
    assert lr_at(opt, 600) == pytest.approx(0.002 + (0.2 - 0.002) * 0.5, rel=1e-3)  # cosine midpoint
    assert lr_at(opt, 1000) == pytest.approx(0.002, rel=1e-3)


def test_constant_schedule_and_other_optimizers():
    cfg = config.resolve("cnn", {"schedule": "constant", "optimizer": "adamw", "learning_rate": 0.003})
    opt = make_optimizer(cfg, steps_per_epoch=10)
    assert isinstance(opt, keras.optimizers.AdamW)
    assert float(np.asarray(opt.learning_rate)) == pytest.approx(0.003)


def _kinds(callbacks):
    return [type(c).__name__ for c in callbacks]


def test_default_callbacks(tmp_path):
    cbs = make_callbacks(config.resolve("cnn"), train_images=10, checkpoint_dir=tmp_path, has_validation=True)
    assert _kinds(cbs) == ["AtomicModelCheckpoint", "DurableBackup", "EpochLogger"]  # logged once durable
    ckpt = cbs[0]
    assert ckpt.monitor == "val_accuracy" and ckpt.save_best_only


def test_early_stopping_and_reduce_lr_on_plateau(tmp_path):
    cfg = config.resolve("cnn", {"early_stopping_patience": 4, "reduce_lr_patience": 2,
                                 "reduce_lr_factor": 0.2, "schedule": "constant"})
    cbs = make_callbacks(cfg, train_images=10, checkpoint_dir=tmp_path, has_validation=True, best_so_far=0.7)
    by_kind = dict(zip(_kinds(cbs), cbs))
    assert by_kind["EarlyStopping"].patience == 4 and by_kind["EarlyStopping"].monitor == "val_accuracy"
    assert by_kind["ReduceLROnPlateau"].patience == 2 and by_kind["ReduceLROnPlateau"].factor == 0.2
    assert by_kind["AtomicModelCheckpoint"].best == 0.7  # a resumed run keeps its best checkpoint
    # the checkpoint keeps the counters of the callbacks before it (their decision on the epoch included)
    assert _kinds(cbs) == ["EarlyStopping", "ReduceLROnPlateau", "AtomicModelCheckpoint", "DurableBackup", "EpochLogger"]
    assert by_kind["DurableBackup"].stateful == cbs[:2]


def test_without_validation_no_checkpoint_and_plateau_watches_training_loss(tmp_path):
    cfg = config.resolve("cnn", {"val_fraction": 0, "reduce_lr_patience": 2, "schedule": "constant"})
    cbs = make_callbacks(cfg, train_images=10, checkpoint_dir=tmp_path, has_validation=False)
    assert "AtomicModelCheckpoint" not in _kinds(cbs)
    assert cbs[0].monitor == "loss"


def test_logged_lr_is_the_rate_at_the_start_of_each_epoch(train_data):
    import mlflow

    from cifarflow.training.trainer import train

    cfg = config.resolve("cnn_small", {"data": str(train_data), "epochs": 2, "width": 0.125, "batch_size": 16,
                                       "val_fraction": 0.25, "warmup_epochs": 0, "learning_rate": 0.1})
    run_id = train(cfg, quiet=True).run_id
    lrs = [m.value for m in sorted(mlflow.tracking.MlflowClient().get_metric_history(run_id, "lr"), key=lambda m: m.step)]
    assert lrs[0] == pytest.approx(0.1) and 0 < lrs[1] < 0.1  # cosine: full rate first, then lower, never 0


def test_the_checkpoint_keeps_early_stopping_counters_and_its_decision(tmp_path):
    import json

    from cifarflow.training.checkpoints import DurableBackup

    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[np.arange(16) % 2]

    def fit(initial_epoch, epochs):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")  # loss stays put
        stop = keras.callbacks.EarlyStopping(monitor="loss", patience=2)
        model.fit(x, y, initial_epoch=initial_epoch, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[stop, DurableBackup(tmp_path, stateful=[stop])])
        return stop

    first = fit(0, 9)
    state = json.loads((tmp_path / "state.json").read_text())
    assert 0 < first.stopped_epoch < 8 and first.wait == 2
    assert state["epoch"] == first.stopped_epoch + 1 and state["stopped"]  # the checkpoint knows it stopped there
    assert state["callbacks"]["EarlyStopping"] == {"wait": 2, "best": first.best, "best_epoch": first.best_epoch,
                                                   "stopped_epoch": first.stopped_epoch}
    resumed = fit(state["epoch"], state["epoch"])  # on resume: restored after its own on_train_begin reset
    assert (resumed.wait, resumed.best, resumed.stopped_epoch) == (2, first.best, first.stopped_epoch)
