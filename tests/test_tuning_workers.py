"""Parallel tuning workers through the command line (issue 11 item 8): the trial budget is exact, and a
killed worker's trial never stays RUNNING, even when the others meet the budget before it goes stale."""

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
from clirun import CIFARFLOW

from cifarflow.training.checkpoints import KILL_HOOK


TINY_SIMPLE5 = ["--set", "batch_size=16", "--set", "val_fraction=0.25", "--set", "warmup_epochs=0",
                "--set", "filters=4", "--set", "dense_units=8"]  # the smallest simple5: startup, not training, costs


def tune_command(data, tmp_path, storage, trials, *, epochs=2, heartbeat=5, study="shared"):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"pruner": {"type": "none"}, "params": {
        "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}))
    return [CIFARFLOW, "tune", "simple5", "--study", study, "--trials", str(trials), "--storage", storage,
            "--space", str(space), "--data", str(data), "--heartbeat", str(heartbeat), "--epochs", str(epochs),
            *TINY_SIMPLE5]


def trial_runs() -> dict[int, mlflow.entities.Run]:
    runs = mlflow.search_runs(experiment_names=["cifarflow/simple5"], output_format="list")
    return {int(r.data.tags["cifarflow.trial"]): r for r in runs if "cifarflow.trial" in r.data.tags}


def wait_for(predicate, timeout=300, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = predicate()
        except Exception:  # the study may not exist yet
            found = None
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_workers_hold_exactly_the_trial_budget(folder_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = tune_command(folder_data, tmp_path, storage, trials=4, epochs=1)
    workers = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # was 5 complete trials for --trials 4
    runs = trial_runs()
    assert sorted(runs) == [0, 1, 2, 3] and {r.info.status for r in runs.values()} == {"FINISHED"}


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_although_the_budget_is_met_before_it_goes_stale(folder_data, tmp_path):
    """Worker A is killed mid-trial; worker B, started while A's trial runs, could meet the budget well within
    A's grace period (2 heartbeats, 10 s). B must not leave A's trial RUNNING: the trial still holds its place
    in the budget until it goes stale; B then fails it (and its MLflow run) and runs the trial in its place."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = tune_command(folder_data, tmp_path, storage, trials=1, epochs=3, heartbeat=5)
    # A SIGKILLs itself once the second epoch's checkpoint is on disk, the first epoch reported: a kill
    # from here after polling for that epoch raced A's 3 short epochs, which CI once saw end first.
    a = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, KILL_HOOK: "durable:1"})

    def running():
        return [t for t in optuna.load_study(study_name="shared", storage=storage).trials if t.state.name == "RUNNING"]

    wait_for(running, what="A's trial")  # B starts (imports TensorFlow) while A trains
    b = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert a.wait(timeout=600) == -signal.SIGKILL
    killed = running()
    assert len(killed) == 1 and list(killed[0].intermediate_values) == [0]  # mid-trial, one epoch reported
    out, err = b.communicate(timeout=600)
    assert b.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # was [RUNNING, COMPLETE], forever
    runs = trial_runs()
    assert runs[0].info.status == "FAILED" and runs[1].info.status == "FINISHED"
    assert "1 complete, 0 pruned, 1 failed" in out


OUTSIDER = """
import sys, time, optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
print("ready", flush=True)
start, folder, rounds = float(sys.stdin.readline()), sys.argv[1], int(sys.argv[2])
lost = 0
for i in range(rounds):
    while time.time() < start + 0.8 * i:
        pass
    try:
        optuna.storages.RDBStorage(f"sqlite:///{folder}/optuna-{i}.db")
    except Exception:
        lost += 1
print("lost", lost, flush=True)
"""


def test_a_worker_survives_another_process_creating_a_new_storage_at_the_same_moment(tmp_path):
    """A process that does not take cifarflow's lock (``optuna.load_study``, the Optuna dashboard, a worker
    on another machine) creates the storage's tables at the same moment as a worker: 12 times, on 12 new
    files. The worker must open every one (before the retry it lost a race and died in each of 3 runs)."""
    from cifarflow.training import tuning

    rounds = 12
    outsider = subprocess.Popen([sys.executable, "-c", OUTSIDER, str(tmp_path), str(rounds)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert outsider.stdout.readline().strip() == "ready"
    start = time.time() + 0.5
    outsider.stdin.write(f"{start}\n")
    outsider.stdin.flush()
    for i in range(rounds):
        time.sleep(max(0.0, start + 0.8 * i - time.time()))
        url = f"sqlite:///{tmp_path}/optuna-{i}.db"
        storage = tuning.open_storage(url, heartbeat=60)
        optuna.create_study(study_name="s", storage=storage, load_if_exists=True)  # the storage works
    out, _ = outsider.communicate(timeout=120)
    assert outsider.returncode == 0 and out.startswith("lost ")
