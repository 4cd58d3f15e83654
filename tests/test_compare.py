"""`cifarflow compare`: the table of several tiny runs, its files and the comparison run."""

from __future__ import annotations

import csv

import mlflow
import pytest

from cifarflow import config
from cifarflow.cli import main
from cifarflow.training.trainer import train

TINY = {"epochs": 1, "batch_size": 16, "val_fraction": 0.25, "warmup_epochs": 0}


def test_compare_tabulates_several_runs(train_data, tmp_path, capsys):
    a = train(config.resolve("cnn_small", {**TINY, "data": str(train_data), "width": 0.125, "dense_units": 16}), quiet=True)
    b = train(config.resolve("simple5", {**TINY, "data": str(train_data), "filters": 4, "dense_units": 8,
                                         "tta": "flip"}), quiet=True)
    trial = train(config.resolve("simple5", {**TINY, "data": str(train_data), "filters": 2, "dense_units": 4}),
                  quiet=True, tags={"cifarflow.trial": "0"})
    main(["evaluate", a.model_uri, "--fgsm-images", "3"])
    capsys.readouterr()
    out = tmp_path / "cmp"
    main(["compare", "--out", str(out), "--latency"])
    printed = capsys.readouterr().out
    assert "| run | recipe | param_count |" in printed and "comparison run " in printed
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert {r["run_id"] for r in rows} == {a.run_id, b.run_id}  # neither the evaluation run nor the trial
    assert trial.run_id not in {r["run_id"] for r in rows}
    accuracies = [float(r["test_accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    by_id = {r["run_id"]: r for r in rows}
    logged_params = mlflow.tracking.MlflowClient().get_run(a.run_id).data.metrics["param_count"]
    assert float(by_id[a.run_id]["param_count"]) == logged_params > 0
    for run_id in (a.run_id, b.run_id):  # training scores like evaluate does: every run has its own ece
        logged_ece = mlflow.tracking.MlflowClient().get_run(run_id).data.metrics["ece"]
        assert float(by_id[run_id]["ece"]) == pytest.approx(logged_ece, abs=1e-4)
    assert by_id[b.run_id]["test_accuracy_tta"] != ""
    for r in rows:
        assert float(r["model_mb"]) > 0 and float(r["latency_ms"]) > 0 and float(r["train_seconds"]) > 0
        m = {k: mlflow.tracking.MlflowClient().get_metric_history(r["run_id"], k) for k in ("train_accuracy", "val_accuracy")}
        last = {k: max(h, key=lambda x: x.step).value for k, h in m.items()}
        assert float(r["train_val_gap"]) == pytest.approx(last["train_accuracy"] - last["val_accuracy"])
    for name in ("comparison.md", "accuracy_vs_params.png", "accuracy_vs_train_time.png", "per_class_accuracy.png"):
        assert (out / name).is_file()
    run = mlflow.search_runs(experiment_names=["cifarflow/comparison"], output_format="list")[0]
    logged = {x.path for x in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"comparison.md", "comparison.csv", "per_class_accuracy.png"} <= logged


def test_compare_without_runs_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--experiments", "cifarflow/nothing"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: no experiment 'cifarflow/nothing'")
