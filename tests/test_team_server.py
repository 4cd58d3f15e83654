"""A team's setup, started the way a team starts it: ``mlflow server`` over PostgreSQL with proxied artifacts,
Optuna studies in PostgreSQL, several processes at once, one of them killed (issue 11, Scale)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import mlflow
import optuna
import pytest
from clirun import CIFARFLOW
from cifarflow.cli import main
from cifarflow.training.checkpoints import KILL_HOOK
from conftest import PG_ROLE_PASSWORD, write_class_folders
from test_tuning_workers import TINY_SIMPLE5, tune_command

pytestmark = pytest.mark.slow

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                 "images_per_second")
TINY = ["--quiet", *TINY_SIMPLE5]


def runs_of(data, experiment="cifarflow/simple5"):
    """The runs of ``experiment`` whose ``data_source`` is ``data`` (this test's own runs on the shared server)."""
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", max_results=1000)
    return [r for r in runs if r.data.params.get("data_source") == str(data)]


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_train_and_evaluate_through_a_postgresql_backed_server(mlflow_pg_server, tmp_path, capsys):
    """In this process (the load test below starts the commands as processes): train, then evaluate the model
    fetched back through the server's artifact proxy."""
    data = tmp_path / "data"
    write_class_folders(data)
    main(["train", "simple5", "--data", str(data), "--epochs", "2", *TINY])
    (run,) = runs_of(data)
    client = mlflow.tracking.MlflowClient()
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied through the server
    assert {"classes.json", "recipe.yaml", "confusion_matrix.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    for key in EPOCH_METRICS:
        assert steps(client, run.info.run_id, key) == [0, 1]
    model_uri = run.data.tags["cifarflow.model_uri"]
    capsys.readouterr()
    main(["evaluate", model_uri])  # the model comes back through the artifact proxy
    assert f"{run.data.metrics['test_accuracy']:.4f}" in capsys.readouterr().out


def test_two_trainers_and_two_tuning_workers_at_once_one_killed_and_restarted(mlflow_pg_server, pg_database,
                                                                                tmp_path):
    """2 ``cifarflow train`` processes log to the server while 2 ``cifarflow tune`` workers share one study in
    PostgreSQL; one worker is killed with SIGKILL mid-trial and started again. Afterwards every run, every
    per-epoch metric and every trial is accounted for, and nothing is left RUNNING."""
    data = tmp_path / "data"
    write_class_folders(data)
    epochs, budget = 2, 3
    started = time.monotonic()
    trainers = [subprocess.Popen([CIFARFLOW, "train", "simple5", "--data", str(data), "--epochs", str(epochs),
                                  "--seed", str(seed), *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for seed in range(2)]
    tune = tune_command(data, tmp_path, pg_database, trials=budget, epochs=epochs, heartbeat=5, study="load")
    # the victim SIGKILLs itself mid-trial, once its trial's last epoch is on disk and its first reported: a kill
    # from here after polling for that epoch raced the victim's short trials (the held trial could have ended)
    victim = subprocess.Popen(tune, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, KILL_HOOK: "durable:1"})
    other = subprocess.Popen(tune, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def victim_running():  # the victim's RUNNING trials (their user attr `worker` ends in its pid)
        trials = optuna.load_study(study_name="load", storage=pg_database).trials
        return [t for t in trials if t.state.name == "RUNNING"
                and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]

    assert victim.wait(timeout=600) == -signal.SIGKILL
    held = victim_running()
    assert len(held) == 1 and list(held[0].intermediate_values) == [0], [(t.number, t.state.name) for t in held]
    (killed,) = held
    restarted = subprocess.Popen(tune, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for p in [*trainers, other, restarted]:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert PG_ROLE_PASSWORD not in out + err
    elapsed = time.monotonic() - started

    client = mlflow.tracking.MlflowClient()
    runs = runs_of(data)
    train_runs = [r for r in runs if "cifarflow.study" not in r.data.tags]
    assert len(train_runs) == 2 and {r.info.status for r in train_runs} == {"FINISHED"}
    assert sorted(r.data.params["seed"] for r in train_runs) == ["0", "1"]
    for r in train_runs:
        for key in EPOCH_METRICS:
            assert steps(client, r.info.run_id, key) == list(range(epochs)), (r.info.run_id, key)
        assert "test_accuracy" in r.data.metrics

    trials = optuna.load_study(study_name="load", storage=pg_database).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == budget and states.count("FAIL") == 1 and len(trials) == budget + 1, states
    assert trials[killed.number].state.name == "FAIL"
    study_runs = mlflow.search_runs(experiment_names=["cifarflow/simple5"], output_format="list",
                                    filter_string="tags.`cifarflow.study` = 'load'")
    parents = [r for r in study_runs if r.data.tags.get("cifarflow.role") == "study"]
    assert len(parents) == 1  # both workers (and the restarted one) joined one parent run
    by_trial = {int(r.data.tags["cifarflow.trial"]): r for r in study_runs if "cifarflow.trial" in r.data.tags}
    assert sorted(by_trial) == [t.number for t in trials]  # one run per trial, none lost, none twice
    for t in trials:
        run = by_trial[t.number]
        assert run.info.status == {"COMPLETE": "FINISHED", "FAIL": "FAILED"}[t.state.name]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        if t.state.name == "COMPLETE":
            assert steps(client, run.info.run_id, "val_accuracy") == list(range(epochs))
    assert not [r for r in runs + study_runs if r.info.status == "RUNNING"]
    print(f"load test: {elapsed:.0f} s for 2 trainers + 3 tuning worker processes")
