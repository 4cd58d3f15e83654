"""The command line: train, data info, one-line errors with exit status 2, and `mlflow run` wiring."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
from conftest import REPO

from cifarflow.cli import main
from cifarflow.tracking import run_name


def test_train_command_prints_the_run(train_data, capsys):
    main(["train", "cnn_small", "--data", str(train_data), "--epochs", "1", "--quiet",
          "--set", "width=0.125", "--set", "batch_size=16", "--set", "val_fraction=0.25"])
    out = capsys.readouterr().out
    assert out.startswith("run ") and "test_accuracy=" in out and "models:/m-" in out
    run = mlflow.search_runs(experiment_names=["cifarflow/cnn_small"], output_format="list")[0]
    assert run.info.run_name == "cnn_small-val_fraction0.25-epochs1-batch_size16-width0.125"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "cnn_small", "--data", "/no/such/data"], "error: data source not found: /no/such/data (pass --data"),
        (["train", "nope"], "error: no recipe 'nope'"),
        (["train", "cnn_small", "--set", "colour=red"], "error: unknown parameter 'colour'"),
        (["data", "info", "/no/such/data"], "error: data source not found"),
        (["data", "info", "cifar10", "--out", "/no/such/dir/grid.png"], "error: folder of --out /no/such/dir/grid.png"),
    ],
)
def test_fixable_errors_are_one_line_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_data_info_prints_counts_and_writes_a_grid(folder_data, tmp_path, capsys):
    out_png = tmp_path / "grid.png"
    main(["data", "info", str(folder_data), "--out", str(out_png)])
    out = capsys.readouterr().out
    assert "36 train, 12 test, 3 classes" in out
    assert "sha256:" in out and out_png.read_bytes()[:4] == b"\x89PNG"
    assert any(line.split() == ["cat", "12", "4"] for line in out.splitlines())


def test_run_name_shows_only_params_that_differ_from_the_recipe():
    from cifarflow import config

    cfg = config.resolve("wrn", {"depth": 16, "width": 4, "data": "/x/y", "epochs": 10, "learning_rate": 0.1})
    assert run_name(cfg, "wrn") == "wrn-epochs10-depth16-width4"
    assert run_name(config.resolve("cnn_small"), "cnn_small") == "cnn_small"
    transfer = config.resolve("mobilenetv2", {"weights": "/tmp/src/backbone.weights.h5", "alpha": 0.35})
    assert run_name(transfer, "mobilenetv2") == "mobilenetv2-weightsbackbone-alpha0.35"


def test_plot_labels_are_cut_in_the_middle():
    from cifarflow.plots import short_label

    assert short_label("resnet20-epochs15") == "resnet20-epochs15"
    cut = short_label("mobilenetv2-epochs10-head_epochs1-fine_tune_epochs9-resolution96-alpha0.35")
    assert len(cut) == 36 and cut.startswith("mobilenetv2-epoch") and cut.endswith("alpha0.35") and "…" in cut


@pytest.mark.slow
def test_mlflow_run_entry_point(train_data, tmp_path):
    """`mlflow run . -e cnn_small` with typed -P parameters trains and logs one finished run."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    cmd = [os.path.join(bindir, "mlflow"), "run", str(REPO), "-e", "cnn_small", "--env-manager", "local",
           "--experiment-name", "cifarflow/cnn_small", "-P", f"data={train_data}", "-P", "epochs=1",
           "-P", "width=0.125", "-P", "batch_size=16", "-P", "warmup_epochs=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["cifarflow/cnn_small"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_name == "cnn_small-epochs1-batch_size16-warmup_epochs0.0-width0.125"
    assert "test_accuracy" in runs[0].data.metrics and runs[0].data.params["width"] == "0.125"


def test_a_real_process_prints_only_the_error_line(tmp_path):
    """As a user sees it: TensorFlow's start-up chatter is held back, one line remains."""
    exe = os.path.join(os.path.dirname(sys.executable), "cifarflow")
    proc = subprocess.run([exe, "train", "cnn_small", "--set", "colour=red"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown parameter 'colour'") and proc.stderr.count("\n") == 1, proc.stderr


def test_mlproject_entry_points_match_the_recipes():
    """Every recipe has an entry point whose parameter defaults are the recipe's own values."""
    import yaml

    from cifarflow import config

    entry_points = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    for recipe in config.available_recipes():
        assert recipe in entry_points, f"no MLproject entry point for recipe {recipe}"
        params = config.resolve(recipe).params()
        for key, spec in entry_points[recipe]["parameters"].items():
            assert f"{{{key}}}" in entry_points[recipe]["command"], f"{recipe}: {key} is not passed on"
            if key in ("data", "limit"):
                continue
            default = config.parse_value(str(spec["default"]))
            if isinstance(default, list):  # e.g. fast's widths "[64,256,256]": the recipe holds a tuple
                default = tuple(default)
            assert default == params[key], f"{recipe}.{key}: MLproject {default!r} != recipe {params[key]!r}"
