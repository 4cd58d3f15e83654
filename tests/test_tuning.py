"""Optuna studies: search files, pruning, nested MLflow runs, resume after a kill, shared storage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import yaml

from cifarflow.cli import main
from cifarflow.training import tuning
from cifarflow.errors import CifarflowError
from cifarflow.training.checkpoints import KILL_HOOK

FIXED = {"epochs": 4, "batch_size": 16, "val_fraction": 0.25, "warmup_epochs": 0}


def write_space(tmp_path, **content):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_the_cnn_search_file_is_found_and_valid():
    path = tuning.find_space("cnn_small")
    space = tuning.load_space(path, "cnn_small")
    assert path.name == "cnn.yaml" and space.direction == "maximize"
    assert set(space.params) == {"dropout", "width", "learning_rate", "label_smoothing", "mixup_alpha"}
    assert space.params["learning_rate"].log
    values = space.suggest(optuna.trial.FixedTrial(
        {"dropout": 0.2, "width": 0.5, "learning_rate": 0.05, "label_smoothing": 0.1, "mixup_alpha": 0.2}))
    assert values["width"] == 0.5 and values["learning_rate"] == 0.05
    assert isinstance(space.pruner.build(), optuna.pruners.MedianPruner)


@pytest.mark.parametrize("params, message", [
    ({"dropuot": {"type": "float", "low": 0.1, "high": 0.5}}, r"param 'dropuot'.*unknown parameter 'dropuot'"),
    ({"dropout": {"type": "float", "low": 0.5, "high": 0.1}}, r"low \(0.5\) must be below high"),
    ({"learning_rate": {"type": "float", "low": 0, "high": 0.1, "log": True}}, r"log scale needs low > 0"),
    ({"width": {"type": "categorical", "choices": []}}, r"non-empty 'choices'"),
    ({"val_fraction": {"type": "float", "low": 0.1, "high": 1.5}}, r"'val_fraction' = 1.5: bad value"),
    ({"dropout": {"type": "uniform", "low": 0.1, "high": 0.5}}, r"params.dropout.type"),
])
def test_bad_search_files_are_one_line_errors(tmp_path, params, message):
    with pytest.raises(CifarflowError, match=message) as e:
        tuning.load_space(write_space(tmp_path, params=params), "cnn_small")
    assert "\n" not in str(e.value)


def test_bad_pruner_enqueue_and_missing_space(tmp_path):
    good = {"dropout": {"type": "float", "low": 0.1, "high": 0.5}}
    with pytest.raises(CifarflowError, match="pruner.type"):
        tuning.load_space(write_space(tmp_path, params=good, pruner={"type": "asha"}), "cnn_small")
    with pytest.raises(CifarflowError, match=r"enqueue\[0\] sets \['width'\]"):
        tuning.load_space(write_space(tmp_path, params=good, enqueue=[{"width": 0.5}]), "cnn_small")
    with pytest.raises(CifarflowError, match="no search space lists recipe 'simple5'"):
        tuning.find_space("simple5")


def pruning_space(tmp_path):
    """A good learning rate first, then two hopeless ones that the median pruner must stop."""
    return write_space(
        tmp_path, pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        params={"learning_rate": {"type": "categorical", "choices": [0.01, 1e-9]}},
        enqueue=[{"learning_rate": 0.01}, {"learning_rate": 1e-9}, {"learning_rate": 1e-9}],
    )


def test_study_prunes_and_nests_trials_under_the_study_run(train_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = tuning.tune("simple5", "prune-me", 3, overrides={**FIXED, "data": str(train_data), "limit": 40},
                        storage=storage, space_path=str(pruning_space(tmp_path)), retrain_best=True)
    states = [t.state.name for t in study.trials]
    assert states[0] == "COMPLETE" and "PRUNED" in states and len(states) == 3
    runs = mlflow.search_runs(experiment_names=["cifarflow/simple5"], output_format="list")
    parent = [r for r in runs if r.data.tags.get("cifarflow.role") == "study"]
    assert len(parent) == 1
    parent = parent[0]
    assert parent.data.tags["cifarflow.optuna_storage"] == storage
    assert parent.data.tags["best.learning_rate"] == "0.01"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    assert parent.data.metrics["trials_pruned"] >= 1
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(parent.info.run_id, "optuna")}
    assert "optuna/optimization_history.png" in artifacts
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["number"]) for r in children) == [0, 1, 2]
    client = mlflow.tracking.MlflowClient()
    for child in children:
        state = study.trials[int(child.data.tags["number"])].state.name
        assert child.data.tags["state"] == state
        assert child.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[state]
        assert child.data.params["learning_rate"] in ("0.01", "1e-09")
        assert client.get_metric_history(child.info.run_id, "val_accuracy")  # per-epoch metrics
    pruned = [c for c in children if c.data.tags["state"] == "PRUNED"]
    assert all(len(client.get_metric_history(c.info.run_id, "val_accuracy")) < FIXED["epochs"] for c in pruned)
    best = [r for r in runs if r.data.tags.get("cifarflow.role") == "retrain-best"]
    assert len(best) == 1 and best[0].data.tags["cifarflow.study"] == "prune-me"
    assert best[0].data.params["val_images"] == "0" and best[0].data.params["epochs"] == "30"
    assert children[0].data.params["limit"] == "40"
    assert best[0].data.params["limit"] == "None" and best[0].data.params["train_images"] == "72"  # all 3 x 24
    assert "test_accuracy" in best[0].data.metrics

    again = tuning.tune("simple5", "prune-me", 3, overrides={**FIXED, "data": str(train_data)}, storage=storage,
                        space_path=str(pruning_space(tmp_path)))
    assert len(again.trials) == 3  # the study already holds 3 complete + pruned trials: nothing more runs
    with pytest.raises(CifarflowError, match=r"study 'prune-me' .*searches \{'recipe': 'simple5', 'metric': 'val_accuracy'\}"):
        tuning.tune("simple5", "prune-me", 4, overrides={**FIXED, "data": str(train_data)}, storage=storage,
                    space_path=str(pruning_space(tmp_path)), metric="val_loss")


def _tune_command(train_data, space, storage, trials, study="shared", epochs=3, heartbeat=1):
    exe = os.path.join(os.path.dirname(sys.executable), "cifarflow")
    return [exe, "tune", "simple5", "--study", study, "--trials", str(trials), "--storage", storage,
            "--space", str(space), "--data", str(train_data), "--heartbeat", str(heartbeat),
            "--epochs", str(epochs), "--set", "batch_size=16", "--set", "val_fraction=0.25", "--set", "warmup_epochs=0",
            "--set", "filters=4", "--set", "dense_units=8"]  # the smallest simple5: the kill and resume are the point


def _space_without_pruning(tmp_path):
    return write_space(tmp_path, pruner={"type": "none"},
                       params={"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})


@pytest.mark.slow
def test_a_killed_study_resumes_and_its_stale_trial_run_ends_failed(train_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = _tune_command(train_data, _space_without_pruning(tmp_path), storage, trials=3, epochs=3)
    # the study kills itself (SIGKILL) in its second trial, once that trial's second epoch is on disk and
    # its first reported: a kill from here after polling for that epoch raced the trial's short epochs
    proc = subprocess.run(command, capture_output=True, timeout=600, env={**os.environ, KILL_HOOK: "durable:1:2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING"] and list(trials[1].intermediate_values) == [0]
    time.sleep(3)  # the killed trial's heartbeat goes stale (grace period 2 s)
    main(command[1:])  # resumed by the same command, in this process (the kill needed the process boundary)
    states = [t.state.name for t in optuna.load_study(study_name="shared", storage=storage).trials]
    assert states[1] == "FAIL" and states.count("COMPLETE") == 3
    runs = mlflow.search_runs(experiment_names=["cifarflow/simple5"], output_format="list")
    assert len([r for r in runs if r.data.tags.get("cifarflow.role") == "study"]) == 1  # the same parent run
    by_trial = {r.data.tags.get("cifarflow.trial"): r for r in runs if "cifarflow.trial" in r.data.tags}
    assert by_trial["1"].info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.parametrize("recipe", ["mobilenetv2", "efficientnetv2b0", "efficientnetb0", "resnet50v2"])
def test_the_transfer_search_file_is_valid_for_every_backbone(recipe):
    path = tuning.find_space(recipe)
    space = tuning.load_space(path, recipe)
    assert path.name == "transfer.yaml"
    assert space.params["resolution"].choices == [96, 128, 160, 224]
    assert (space.params["fine_tune_fraction"].low, space.params["fine_tune_fraction"].high) == (0.0, 0.75)


def test_the_lite0_search_file_is_valid_and_starts_from_the_recipe():
    """experiments/search/efficientnet_lite0.yaml: the issue's dims, and its enqueued first trial is the recipe itself."""
    from cifarflow import config as cfg

    path = tuning.find_space("efficientnet_lite0")
    space = tuning.load_space(path, "efficientnet_lite0")
    assert path.name == "efficientnet_lite0.yaml"
    assert {"dropout", "fine_tune_fraction", "resolution"} <= set(space.params)
    recipe = cfg.resolve("efficientnet_lite0", {})
    first = space.enqueue[0]
    assert first["resolution"] == recipe.model_params["resolution"]
    assert first["dropout"] == recipe.model_params["dropout"]
    assert first["fine_tune_fraction"] == recipe.fine_tune_fraction
    assert first["fine_tune_learning_rate"] == recipe.fine_tune_learning_rate
