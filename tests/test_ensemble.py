"""Ensembles: soft vs hard voting on crafted probabilities, `cifarflow ensemble` end to end, its pyfunc model registered and served."""

from __future__ import annotations

import json
import logging

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from cifarflow import config
from cifarflow.cli import main
from cifarflow.evaluation import voting
from cifarflow.evaluation.ensemble import parse_weights
from cifarflow.errors import CifarflowError
from cifarflow.tracking import refs
from cifarflow.training.trainer import train
from conftest import post, serving

# three members, two images, three classes
A = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
B = np.array([[0.4, 0.6, 0.0], [0.1, 0.1, 0.8]])
C = np.array([[0.45, 0.55, 0.0], [0.6, 0.3, 0.1]])


def test_soft_voting_averages_and_hard_voting_counts_votes():
    soft = voting.combine([A, B, C], "soft")
    np.testing.assert_allclose(soft, [[1.75 / 3, 1.25 / 3, 0.0], [0.3, 0.7 / 3, 1.4 / 3]], atol=1e-6)
    hard = voting.combine([A, B, C], "hard")
    np.testing.assert_allclose(hard, [[1 / 3, 2 / 3, 0.0], [1 / 3, 0.0, 2 / 3]], atol=1e-6)
    assert soft.argmax(1).tolist() == [0, 2] and hard.argmax(1).tolist() == [1, 2]  # they disagree on image 0


def test_weights_shift_the_vote():
    soft = voting.combine([A, B], "soft", [3, 1])
    np.testing.assert_allclose(soft[0], [0.775, 0.225, 0.0], atol=1e-6)
    hard = voting.combine([A, B, C], "hard", [2, 1, 0])  # C has no say
    np.testing.assert_allclose(hard[1], [0.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(voting.combine([A, B, C], "hard", [1, 0, 0]), np.eye(3)[[0, 2]], atol=1e-5)


def test_hard_ties_go_to_the_higher_soft_probability():
    # votes 0 vs 1 tie at 0.5; the soft average (0.45, 0.55) picks class 1, not the lowest index
    out = voting.combine([np.array([[0.6, 0.4]]), np.array([[0.3, 0.7]])], "hard")
    assert out.argmax(1).tolist() == [1]
    np.testing.assert_allclose(out, [[0.5, 0.5]], atol=1e-5)
    out = voting.combine([A, B, C], "hard", [2, 1, 1])  # image 0: class 0 (2 votes) vs class 1 (2 votes)
    assert out.argmax(1).tolist() == [0, 2]  # soft 0.6625 vs 0.3375


@pytest.mark.parametrize("probs,method,weights,message", [
    ([A, B], "median", None, "unknown voting method"),
    ([A, B], "soft", [1, -1], "non-negative"),
    ([A, B], "soft", [0, 0], "not all zero"),
    ([A, B], "soft", [1, 2, 3], "must be 2"),
    ([A, B[:1]], "soft", None, "shape"),
    ([], "soft", None, "at least one member"),
])
def test_bad_voting_input_is_refused(probs, method, weights, message):
    with pytest.raises(ValueError, match=message):
        voting.combine(probs, method, weights)


def test_parse_weights():
    assert parse_weights(["2,1"], 2) == [2.0, 1.0] and parse_weights(["2", "1"], 2) == [2.0, 1.0]
    assert parse_weights((), 2) is None
    for bad in (["x,1"], ["1"], ["1,-1"], ["0,0"]):
        with pytest.raises(CifarflowError):
            parse_weights(bad, 2)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny cnn_small runs on the same data with other seeds and widths, in a module-wide store; (root, [TrainResult])."""
    from conftest import isolate, write_class_folders

    root = tmp_path_factory.mktemp("ensemble_store")
    write_class_folders(root / "train_data", per_class=(24, 6))
    results = []
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        for seed, width in ((1, 0.125), (2, 0.25)):
            results.append(train(config.resolve("cnn_small", {
                "data": str(root / "train_data"), "epochs": 1, "width": width, "dense_units": 16, "batch_size": 16,
                "val_fraction": 0.25, "warmup_epochs": 0, "seed": seed}), quiet=True, run_name=f"cnn_small-seed{seed}"))
    return root, results


@pytest.fixture
def members(two_runs, tmp_path):
    import shutil

    root, results = two_runs
    shutil.copyfile(root / "mlflow.db", tmp_path / "mlflow.db")
    return root, results


def member_probs(results, x):
    return [refs.load_keras(r.model_uri).predict(x.astype(np.float32), verbose=0) for r in results]


@pytest.mark.slow
def test_ensemble_command_scores_and_logs_a_pyfunc_model(members, capsys):
    root, (r1, r2) = members
    from cifarflow.data import datasets

    x, y = datasets.load(str(root / "train_data")).x_test, datasets.load(str(root / "train_data")).y_test
    probs = member_probs([r1, r2], x)
    main(["ensemble", r1.model_uri, r2.run_id, "--weights", "3,1", "--fgsm-images", "6", "--tta", "flip"])
    out = capsys.readouterr().out
    assert "member cnn_small-seed1: test_accuracy=" in out and "ensemble soft: test_accuracy=" in out
    run = mlflow.search_runs(experiment_names=["cifarflow/ensemble"], output_format="list")[0]
    expected = voting.combine(probs, "soft", [3, 1])
    m = run.data.metrics
    assert m["test_accuracy"] == pytest.approx(float((expected.argmax(1) == y).mean()))
    assert {"ece", "nll", "macro_f1", "test_accuracy_tta", "robust_accuracy_fgsm", "param_count", "train_seconds"} <= set(m)
    logged = [MlflowClient().get_run(r.run_id).data.metrics for r in (r1, r2)]
    assert m["param_count"] == logged[0]["param_count"] + logged[1]["param_count"] > 0
    history = MlflowClient().get_metric_history(run.info.run_id, "member_test_accuracy")
    assert sorted((h.step, h.value) for h in history) == [
        (0, pytest.approx(float((probs[0].argmax(1) == y).mean()))), (1, pytest.approx(float((probs[1].argmax(1) == y).mean())))]
    assert run.info.run_name == "ensemble-soft-cnn_small-seed1+cnn_small-seed2"
    assert run.data.tags["cifarflow.members"] == f"{r1.run_id},{r2.run_id}"
    assert json.loads(run.data.params["weights"]) == [3.0, 1.0]
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "reliability_diagram.png", "metrics.md"} <= names

    model_uri = run.data.tags["cifarflow.model_uri"]
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    np.testing.assert_allclose(pyfunc.predict(x.astype(np.float32)), expected, atol=1e-5)

    # registered like any other model, evaluated through its members, pulled as an MLflow model folder
    main(["register", run.info.run_id])
    assert "registered cifarflow-ensemble version 1" in capsys.readouterr().out
    main(["evaluate", "models:/cifarflow-ensemble@challenger", "--fgsm-images", "4"])
    ev = mlflow.search_runs(experiment_names=["cifarflow/evaluation"], output_format="list")[0]
    assert ev.data.metrics["test_accuracy"] == pytest.approx(m["test_accuracy"])
    assert ev.data.tags["cifarflow.source_run_id"] == run.info.run_id
    capsys.readouterr()
    main(["pull", "cifarflow-ensemble@challenger", "--format", "mlflow", "--dest", "deploy"])
    pulled = mlflow.pyfunc.load_model("deploy/model")
    np.testing.assert_allclose(pulled.predict(x[:3].astype(np.float32)), expected[:3], atol=1e-5)
    from cifarflow.evaluation import compare  # compared like any run, its batch-1 latency through pyfunc

    row = compare.collect(["cifarflow/ensemble"], latency=True)[0]
    assert row["run_id"] == run.info.run_id and row["param_count"] == m["param_count"] and row["latency_ms"] > 0
    assert row["ece"] == pytest.approx(ev.data.metrics["ece"]) and row["model_mb"] > 0
    with pytest.raises(SystemExit) as e:  # not a Keras model: no ONNX/TFLite export
        main(["export", "cifarflow-ensemble@challenger", "--format", "onnx"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "is not a Keras model" in err and err.count("\n") == 1


@pytest.mark.slow
def test_hard_voting_ensemble_is_served_by_mlflow(members, tmp_path, caplog):
    root, (r1, r2) = members
    from cifarflow.data import datasets
    from cifarflow.evaluation.ensemble import ensemble

    x = datasets.load(str(root / "train_data")).x_test
    mlflow_log = logging.getLogger("mlflow")  # it does not propagate to the root logger caplog listens on
    mlflow_log.addHandler(caplog.handler)
    try:
        result = ensemble([r1.run_id, r2.run_id], "hard", fgsm_images=3)
    finally:
        mlflow_log.removeHandler(caplog.handler)
    # MLflow logs the model config as params too: equal weights must read alike in both
    assert json.loads(MlflowClient().get_run(result.run_id).data.params["weights"]) == [1.0, 1.0]
    assert "Failed to log model config" not in caplog.text
    expected = voting.combine(member_probs([r1, r2], x), "hard")
    with serving(["models", "serve", "-m", result.model_uri, "--env-manager", "local"], tmp_path / "serve.log",
                 "/ping") as base:
        status, body = post(f"{base}/invocations", json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200, body
        np.testing.assert_allclose(np.array(json.loads(body)["predictions"]), expected, atol=1e-5)
        status, _ = post(f"{base}/invocations", json.dumps({"inputs": [[1, 2, 3]]}).encode())
        assert 400 <= status < 500


@pytest.mark.parametrize("argv,message", [
    (["ensemble", "RUN1"], "error: an ensemble needs two or more models"),
    (["ensemble", "RUN1", "RUN2", "--weights", "1,2,3"], "error: --weights 1,2,3 must be 2"),
    (["ensemble", "RUN1", "0" * 32], "error: no run 0000"),
])
def test_ensemble_errors_are_one_line(members, argv, message, capsys):
    _, (r1, _) = members
    with pytest.raises(SystemExit) as e:
        main([a.replace("RUN1", r1.run_id).replace("RUN2", r1.run_id) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_members_of_other_data_are_refused(members, folder_data, capsys):
    _, (r1, _) = members
    other = train(config.resolve("cnn_small", {"data": str(folder_data), "epochs": 1, "width": 0.125, "dense_units": 8,
                                               "batch_size": 16, "val_fraction": 0.25, "warmup_epochs": 0}), quiet=True)
    with pytest.raises(SystemExit):
        main(["ensemble", r1.run_id, other.run_id])
    err = capsys.readouterr().err
    assert "was trained on other data (dataset sha256)" in err and err.count("\n") == 1
