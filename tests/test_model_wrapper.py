"""The logged model's pyfunc: silent predictions (stdout of `mlflow models predict` is JSON) and refusal of NaN,
infinite and out-of-range pixels in serving, the Python API and evaluation (issue 16 item 1, issue 11 item 10)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from conftest import post, serving

BAD_PIXELS = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "above 255": 255.5, "below 0": -1.0}


def pixels(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3)).astype(np.float32)


def with_bad_pixel(value: float) -> np.ndarray:
    x = pixels()
    x[1, 5, 7, 2] = value
    return x


def mlflow_exe() -> str:
    return os.path.join(os.path.dirname(sys.executable), "mlflow")


@pytest.mark.slow
def test_mlflow_models_predict_writes_json_only(trained, tmp_path):
    (tmp_path / "input.json").write_text(json.dumps({"inputs": pixels().tolist()}))
    proc = subprocess.run([mlflow_exe(), "models", "predict", "-m", trained.model_uri, "-i", str(tmp_path / "input.json"),
                           "-t", "json", "--env-manager", "local"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probs = np.array(json.loads(proc.stdout)["predictions"])  # nothing but the JSON on stdout
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert "\x1b" not in proc.stderr and "oneDNN" not in proc.stderr, proc.stderr[-2000:]


def test_pyfunc_predicts_silently_and_like_keras(trained, capfd):
    from cifarflow.tracking import refs

    model = mlflow.pyfunc.load_model(trained.model_uri)
    capfd.readouterr()
    x = pixels(5)
    probs = model.predict(x)
    out, err = capfd.readouterr()
    assert out == "" and "\x1b" not in err
    ref = refs.load_keras(trained.model_uri).predict(x, verbose=0)
    assert np.abs(np.asarray(probs) - ref).max() < 1e-5


@pytest.mark.parametrize("name", list(BAD_PIXELS))
def test_pyfunc_refuses_bad_pixels(trained, name):
    model = mlflow.pyfunc.load_model(trained.model_uri)
    with pytest.raises(MlflowException, match=r"pixel.*0\.\.255") as e:
        model.predict(with_bad_pixel(BAD_PIXELS[name]))
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "image 1" in str(e.value)


def test_evaluation_refuses_bad_pixels(trained):
    from cifarflow.errors import CifarflowError
    from cifarflow.evaluation.metrics import predict_probs
    from cifarflow.tracking import refs

    model = refs.load_keras(trained.model_uri)
    with pytest.raises(CifarflowError, match=r"pixel"):
        predict_probs(model, with_bad_pixel(np.nan))


@pytest.mark.slow
def test_mlflow_models_serve_answers_4xx_to_bad_pixels(trained, tmp_path):
    with serving(["models", "serve", "-m", trained.model_uri, "--env-manager", "local"],
                 tmp_path / "serve.log", "/ping") as base:
        status, body = post(f"{base}/invocations", json.dumps({"inputs": pixels().tolist()}).encode())
        assert status == 200, body
        for name, value in BAD_PIXELS.items():
            x = with_bad_pixel(value).tolist()
            # JSON has no NaN/Infinity literals; Python's json writes them and MLflow's server reads them
            status, body = post(f"{base}/invocations", json.dumps({"inputs": x}).encode())
            assert 400 <= status < 500, (name, status, body[:300])
            assert b"0..255" in body, body[:500]
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "\x1b[32m" not in log and "step" not in log.split("Listening")[-1], log[-2000:]
