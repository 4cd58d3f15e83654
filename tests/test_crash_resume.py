"""kill -9 inside the checkpoint window, made deterministic by the CIFARFLOW_TEST_KILL hook, then --resume
(issue 11 items 1 and 4): no epoch lost or logged twice, a damaged checkpoint is one line naming the previous
good epoch, train_seconds sums the segments, and a refused resume leaves the run as it was."""

from __future__ import annotations

import shutil

import mlflow
import pytest
from clirun import assert_one_line_error, cli

pytestmark = pytest.mark.slow

TINY = ["--quiet", "--set", "width=0.125", "--set", "dense_units=16", "--set", "batch_size=16",
        "--set", "val_fraction=0.25", "--set", "warmup_epochs=0"]
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                 "images_per_second")


def killed_run(data, kill: str, epochs: int = 3, recipe: str = "cnn_small") -> str:
    """Train until the hook SIGKILLs the process; returns the id of the run it left behind."""
    proc = cli("train", recipe, "--data", data, "--epochs", epochs, *TINY, env={"CIFARFLOW_TEST_KILL": kill})
    assert proc.returncode == -9, proc.stderr[-3000:]
    (run,) = mlflow.search_runs(experiment_names=[f"cifarflow/{recipe}"], output_format="list")
    return run.info.run_id


def steps(run_id, key):
    return sorted(m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, key))


def resume(data, run_id, epochs=3, recipe="cnn_small"):
    return cli("train", recipe, "--data", data, "--epochs", epochs, *TINY, "--resume", run_id)


def test_killed_with_half_a_checkpoint_written_it_resumes_from_the_last_durable_epoch(train_data):
    run_id = killed_run(train_data, "partial:1")
    assert steps(run_id, "val_accuracy") == [0]  # epoch 1 was not logged: its checkpoint never became durable
    proc = resume(train_data, run_id)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = mlflow.tracking.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    for key in EPOCH_METRICS:
        assert steps(run_id, key) == [0, 1, 2], key  # every epoch once, none lost, none twice


def test_killed_after_the_checkpoint_before_the_log_no_epoch_is_lost_and_damage_is_one_line(train_data, tmp_path):
    run_id = killed_run(train_data, "durable:1")
    assert steps(run_id, "val_accuracy") == [0]  # epoch 1 durable on disk, its MLflow log never happened
    backup = tmp_path / "checkpoints" / run_id / "backup"
    current = backup / "epoch-1.weights.h5"
    saved = tmp_path / "saved.weights.h5"
    shutil.copyfile(current, saved)
    current.write_bytes(current.read_bytes()[:1000])  # damaged behind our back (disk, a copy gone wrong)
    line = assert_one_line_error(resume(train_data, run_id), "checkpoint of epoch 1", "is damaged",
                                 "previous good checkpoint is epoch 0")
    assert "Traceback" not in line
    shutil.copyfile(saved, current)
    proc = resume(train_data, run_id)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.tracking.MlflowClient()
    for key in EPOCH_METRICS:
        assert steps(run_id, key) == [0, 1, 2], key  # epoch 1's metrics came from its checkpoint
    run = client.get_run(run_id)
    epoch_seconds = sum(m.value for m in client.get_metric_history(run_id, "epoch_seconds"))
    assert run.data.metrics["train_seconds"] >= 0.99 * epoch_seconds  # both segments, not only the last


def test_a_refused_resume_writes_nothing(train_data):
    run_id = killed_run(train_data, "durable:0", epochs=2)
    client = mlflow.tracking.MlflowClient()
    before = client.get_run(run_id)
    proc = cli("train", "simple5", "--data", train_data, "--epochs", 2, "--quiet", "--set", "batch_size=16",
               "--set", "val_fraction=0.25", "--resume", run_id)
    assert_one_line_error(proc, f"run {run_id} was logged with other settings", "cifarflow.recipe: cnn_small -> simple5")
    after = client.get_run(run_id)
    assert after.info.status == before.info.status and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags and after.data.params == before.data.params
    assert after.data.metrics == before.data.metrics
    assert resume(train_data, run_id, epochs=2).returncode == 0  # and it still resumes with its own settings
