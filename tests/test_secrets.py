"""Credentials in storage and tracking URLs never reach output or MLflow (issue 11 item 11)."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from clirun import assert_one_line_error, in_process
from conftest import PG_ROLE, PG_ROLE_PASSWORD, free_port


def test_an_unreachable_optuna_storage_error_masks_its_password(train_data, capfd):
    url = f"postgresql://optuna:TopSecret-99@127.0.0.1:{free_port()}/studies"  # nothing listens there
    proc = in_process(capfd, "tune", "cnn_small", "--study", "s", "--trials", "1", "--storage", url,
                      "--data", train_data, "--epochs", "1")
    line = assert_one_line_error(proc, "postgresql://optuna:***@127.0.0.1")
    assert "TopSecret-99" not in proc.stderr + proc.stdout, line


@pytest.mark.slow
def test_a_postgresql_study_logs_its_storage_without_the_password(pg_database, train_data, tmp_path, capfd):
    """A real study on PostgreSQL: the parent run's ``cifarflow.optuna_storage`` tag names the storage with
    the password masked, and no tag or param of any run holds the password."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"pruner": {"type": "none"},
                                     "params": {"learning_rate": {"type": "categorical", "choices": [0.01]}}}))
    proc = in_process(capfd, "tune", "simple5", "--study", "pg", "--trials", "1", "--storage", pg_database,
                      "--space", space, "--data", train_data, "--epochs", "1", "--set", "batch_size=16",
                      "--set", "val_fraction=0.25")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PG_ROLE_PASSWORD not in proc.stdout + proc.stderr
    runs = mlflow.search_runs(experiment_names=["cifarflow/simple5"], output_format="list")
    parent = [r for r in runs if r.data.tags.get("cifarflow.role") == "study"][0]
    assert parent.data.tags["cifarflow.optuna_storage"] == pg_database.replace(PG_ROLE_PASSWORD, "***")
    assert f"{PG_ROLE}:***@127.0.0.1" in parent.data.tags["cifarflow.optuna_storage"]
    for run in runs:
        logged = " ".join([*run.data.tags.values(), *run.data.params.values()])
        assert PG_ROLE_PASSWORD not in logged
