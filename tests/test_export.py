"""Export to ONNX and every TFLite mode with parity asserted, pull by alias, and `mlflow models serve` on the champion."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from cifarflow.cli import main
from cifarflow.data import datasets
from cifarflow.deploy import export, pull, registry
from cifarflow.errors import CifarflowError
from cifarflow.tracking import refs
from conftest import post, serving

NAME = "cifarflow-cnn"


@pytest.fixture
def champion(trained):
    """The tiny trained model registered as version 1 of cifarflow-cnn, champion and challenger."""
    registry.register(refs.resolve_source(trained.run_id))
    registry.promote(NAME)
    return trained


def keras_probs(model_uri: str, x: np.ndarray) -> np.ndarray:
    return refs.load_keras(model_uri).predict(x.astype(np.float32), verbose=0)


def test_export_onnx_and_every_tflite_mode_with_parity(champion):
    results, run_id = export.export(f"{NAME}@champion", ["onnx", "tflite"], list(export.QUANTIZE))
    by_kind = {r.kind: r for r in results}
    assert set(by_kind) == {"onnx", "tflite_float32", "tflite_float16", "tflite_dynamic", "tflite_int8"}
    out = Path("export") / NAME / "1"
    assert sorted(p.name for p in out.iterdir()) == [
        "model.onnx", "model_dynamic.tflite", "model_float16.tflite", "model_float32.tflite", "model_int8.tflite",
        "parity.json"]
    assert by_kind["onnx"].max_abs_diff < 1e-4 and by_kind["tflite_float32"].max_abs_diff < 1e-4
    assert by_kind["tflite_int8"].top1_agreement >= 0.95
    for r in results:
        assert r.passed and r.images == 18 and r.size_bytes == Path(r.path).stat().st_size > 10_000
        assert abs(r.test_accuracy - champion.metrics["test_accuracy"]) <= 1 / 18 + 1e-9
    assert by_kind["tflite_int8"].size_bytes < 0.5 * by_kind["tflite_float32"].size_bytes
    assert json.loads((out / "parity.json").read_text())["tflite_int8"]["passed"] is True

    x = datasets.load(MlflowClient().get_run(champion.run_id).data.params["data_source"]).x_test
    ref = keras_probs(champion.model_uri, x)
    assert np.abs(export.predict_onnx(out / "model.onnx", x[:5]) - ref[:5]).max() < 1e-4  # dynamic batch
    assert np.abs(export.predict_tflite(out / "model_float32.tflite", x[:1]) - ref[:1]).max() < 1e-4

    client = MlflowClient()
    tags = client.get_model_version(NAME, "1").tags
    assert tags["cifarflow.export.tflite_int8.run_id"] == tags["cifarflow.export.onnx.run_id"] == run_id
    assert not [k for k in tags if k.startswith("cifarflow.export.") and not k.endswith(".run_id")]  # figures in the run
    run = client.get_run(run_id)
    assert run.data.tags["cifarflow.source_run_id"] == champion.run_id
    assert run.data.metrics["onnx_max_abs_diff"] < 1e-4 and "tflite_int8_test_accuracy" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/model.onnx", "export/model_int8.tflite", "export/parity.json"} <= logged


def test_pull_by_alias_writes_the_model_and_its_card(champion, capsys):
    source = Path(urllib.parse.urlparse(mlflow.get_logged_model(champion.model_uri.removeprefix("models:/")).artifact_location).path)
    (source / "registered_model_meta").unlink(missing_ok=True)  # written there by `mlflow models serve`
    main(["export", "models:/cifarflow-cnn/1", "--format", "onnx"])
    assert "onnx" in capsys.readouterr().out
    main(["pull", f"{NAME}@champion", "--format", "onnx", "--dest", "deploy"])
    main(["pull", f"{NAME}@challenger", "--format", "keras", "--dest", "deploy_keras"])
    card = json.loads(Path("deploy/model_card.json").read_text())
    assert card["name"] == NAME and card["version"] == "1" and set(card["aliases"]) == {"champion", "challenger"}
    assert card["classes"] == ["cat", "dog", "ship"] and card["file"] == "model.onnx"
    assert card["input"]["shape"] == [None, 32, 32, 3] and card["input"]["range"] == [0, 255]
    assert card["source_run_id"] == champion.run_id and card["metrics"]["test_accuracy"] == champion.metrics["test_accuracy"]
    assert card["export"]["max_abs_diff"] < 1e-4 and card["export"]["size_bytes"] > 10_000

    x = datasets.load(MlflowClient().get_run(champion.run_id).data.params["data_source"]).x_test
    ref = keras_probs(champion.model_uri, x)
    assert np.abs(export.predict_onnx("deploy/model.onnx", x) - ref).max() < 1e-4
    import keras

    pulled = keras.saving.load_model("deploy_keras/model.keras")
    assert np.abs(pulled.predict(x.astype(np.float32), verbose=0) - ref).max() < 1e-6
    assert not (source / "registered_model_meta").exists()  # the training run's artifacts stay as logged
    with pytest.raises(CifarflowError, match="has no tflite_int8 export"):
        pull.pull(f"{NAME}@champion", "tflite", Path("x"), quantize="int8")


def test_failed_parity_writes_no_file(champion, monkeypatch):
    monkeypatch.setitem(export.TOLERANCE, "onnx", {"max_abs_diff": 0.0})
    with pytest.raises(CifarflowError, match="parity check failed for onnx"):
        export.export(f"{NAME}@champion", ["onnx"])
    out = Path("export") / NAME / "1"
    assert [p.name for p in out.iterdir()] == ["parity.json"]
    assert json.loads((out / "parity.json").read_text())["onnx"]["passed"] is False
    assert "cifarflow.export.onnx.run_id" not in MlflowClient().get_model_version(NAME, "1").tags


def test_export_refuses_other_test_data(champion, folder_data):
    with pytest.raises(CifarflowError, match="is not the data run"):
        export.export(f"{NAME}@champion", ["onnx"], data=str(folder_data))


@pytest.mark.slow
def test_mlflow_models_serve_answers_raw_pixels(champion, tmp_path):
    """A real `mlflow models serve` of models:/cifarflow-cnn@champion on 127.0.0.1, fed JSON raw pixels."""
    x = datasets.load(MlflowClient().get_run(champion.run_id).data.params["data_source"]).x_test
    ref = keras_probs(champion.model_uri, x)
    with serving(["models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local"],
                 tmp_path / "serve.log", "/ping") as base:
        status, body = post(f"{base}/invocations", json.dumps({"inputs": x.tolist()}).encode())  # uint8 ints
        assert status == 200, body
        probs = np.array(json.loads(body)["predictions"])
        assert probs.shape == (18, 3) and np.abs(probs - ref).max() < 1e-5

        for bad in (json.dumps({"inputs": [[1, 2, 3]]}).encode(), b"not json", b'{"pixels": []}'):
            status, body = post(f"{base}/invocations", bad)
            assert 400 <= status < 500, (status, body)
        status, body = post(f"{base}/invocations", json.dumps({"inputs": x[:2].tolist()}).encode())
        assert status == 200 and np.array(json.loads(body)["predictions"]).argmax(1).tolist() == ref[:2].argmax(1).tolist()
