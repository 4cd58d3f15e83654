"""`cifarflow tune` as a user sees it: one line per finished trial, and an MLflow study run and Optuna study
that explain themselves and point at each other (issue 16 items 2 and 6)."""

from __future__ import annotations

import os
import re

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from conftest import isolate, write_class_folders
from test_what_users_see import NOISE, TINY, cifarflow


@pytest.fixture(scope="module")
def piped_tune(tmp_path_factory):
    """A 2-trial study on tiny data through the real command, output piped; returns what a test needs."""
    root = tmp_path_factory.mktemp("piped_tune")
    write_class_folders(root / "data", per_class=(24, 6))
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump({
        "recipes": ["cnn_small"], "metric": "val_accuracy", "seed": 3, "pruner": {"type": "none"},
        "params": {"dropout": {"type": "float", "low": 0.0, "high": 0.5},
                   "learning_rate": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}}))
    storage = f"sqlite:///{root / 'optuna.db'}"
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        proc = cifarflow("tune", "cnn_small", "--study", "pages", "--trials", "2", "--storage", storage,
                         "--space", str(space), "--data", str(root / "data"), "--epochs", "2", *TINY, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    return proc, client, optuna.load_study(study_name="pages", storage=storage)


@pytest.mark.slow
def test_tune_prints_one_line_per_finished_trial(piped_tune):
    proc, _, study = piped_tune
    lines = [line for line in proc.stdout.splitlines() if line.startswith("trial ")]
    assert len(lines) == len(study.trials) == 2, proc.stdout
    for line, trial in zip(lines, study.trials):
        run_id = trial.user_attrs["mlflow_run_id"]
        assert re.match(rf"trial {trial.number} COMPLETE val_accuracy=\d\.\d{{4}} ", line), line
        assert "dropout=" in line and "learning_rate=" in line and line.endswith(f"run {run_id}"), line
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout
    for noise in NOISE:
        assert noise not in proc.stderr, f"{noise!r} leaked:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_the_study_run_logs_its_settings_and_points_to_the_study(piped_tune):
    _, client, study = piped_tune
    parent = client.search_runs([client.get_experiment_by_name("cifarflow/cnn_small").experiment_id],
                                filter_string="tags.`cifarflow.role` = 'study'")[0]
    p = parent.data.params
    assert p["recipe"] == "cnn_small" and p["trials"] == "2" and p["epochs"] == "2" and p["metric"] == "val_accuracy"
    assert p["sampler"].startswith("TPESampler") and p["pruner"].startswith("NopPruner")
    assert p["storage"].startswith("sqlite:///") and "space.dropout" in p and "log" in p["space.learning_rate"]
    assert parent.data.tags["cifarflow.study"] == "pages" and parent.data.tags["mlflow.note.content"]
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert study.metric_names == ["val_accuracy"]
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["cifarflow.trial"] == str(trial.number)
    best = {k: v for k, v in parent.data.tags.items() if k.startswith("best.")}
    assert best and all(len(v) <= 8 for v in best.values()), best  # rounded for display
    assert parent.data.metrics["best_val_accuracy"] == study.best_value  # full precision in the data


def test_storage_credentials_are_masked_in_the_study_params():
    from cifarflow import config
    from cifarflow.training import tuning

    space = tuning.load_space(tuning.find_space("cnn_small"), "cnn_small")
    params = tuning.study_params("cnn_small", 2, "postgresql://ann:s3cret@db:5432/optuna", "val_accuracy", space,
                                 "cnn.yaml", config.resolve("cnn_small", {"epochs": 3}), {"epochs": 3, "dropout": 0.1})
    assert params["storage"] == "postgresql://ann:***@db:5432/optuna" and "s3cret" not in str(params)
    assert params["epochs"] == 3 and params["fixed.dropout"] == 0.1 and params["space.learning_rate"] == "float 0.01..0.3 log"
    assert params["pruner"] == "MedianPruner(n_startup_trials=2, n_warmup_steps=1)"
