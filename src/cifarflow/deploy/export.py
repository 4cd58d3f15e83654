"""Export: ONNX (tf2onnx) and TFLite (subprocess converter) files of a registered model, verified against Keras."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cifarflow.errors import CifarflowError
from cifarflow.serving import held_stderr

FORMATS = ("onnx", "tflite")
QUANTIZE = ("none", "float16", "dynamic", "int8")
ONNX_OPSET = 17
REPRESENTATIVE_IMAGES = 256
EXPORT_FIGURES = ("size_bytes", "max_abs_diff", "top1_agreement", "test_accuracy")  # logged as <kind>_<figure>
# Parity required before an export counts as done, against the Keras model's
# probabilities on the test set: max abs difference for the float32 files,
# top-1 agreement (fraction) for the reduced-precision ones.
TOLERANCE = {
    "onnx": {"max_abs_diff": 1e-4},
    "tflite_float32": {"max_abs_diff": 1e-4},
    "tflite_float16": {"top1_agreement": 0.99},
    "tflite_dynamic": {"top1_agreement": 0.95},
    "tflite_int8": {"top1_agreement": 0.95},
}


def kind_of(fmt: str, quantize: str = "none") -> str:
    """Export kind: ``onnx`` or ``tflite_<float32|float16|dynamic|int8>`` (``none`` is float32)."""
    if fmt == "onnx":
        return "onnx"
    return f"tflite_{'float32' if quantize == 'none' else quantize}"


def artifact_name(kind: str) -> str:
    """File name of an export kind: ``model.onnx``, ``model_<mode>.tflite``."""
    return "model.onnx" if kind == "onnx" else f"model_{kind.removeprefix('tflite_')}.tflite"


@dataclass(frozen=True)
class ExportResult:
    """One verified export file and its figures.

    ``max_abs_diff`` is the largest absolute difference of a probability
    against Keras, ``top1_agreement`` the fraction of images with the same
    arg-max as Keras, ``test_accuracy`` the file's own accuracy; all over the
    ``images`` test images. ``size_bytes`` is the file size.
    """

    kind: str
    path: str
    size_bytes: int
    max_abs_diff: float
    top1_agreement: float
    test_accuracy: float
    keras_test_accuracy: float
    images: int
    passed: bool
    required: dict


# ---------------------------------------------------------------- runtimes


def predict_onnx(path: Path | str, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Probabilities (N, C) float32 of ONNX file ``path`` on raw pixels ``x`` (N, 32, 32, 3), with ONNX Runtime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.asarray(x, dtype=np.float32)
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def tflite_interpreter(path: Path | str, num_threads: int | None = None):
    """A LiteRT interpreter (``ai_edge_litert``) of a ``.tflite`` file, tensors not yet allocated."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=num_threads)


def predict_tflite(path: Path | str, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Probabilities (N, C) float32 of ``.tflite`` file ``path`` on raw pixels ``x`` (N, 32, 32, 3), with LiteRT."""
    interpreter = tflite_interpreter(path)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    x = np.asarray(x, dtype=inp["dtype"])
    shape, chunks = None, []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        if chunk.shape != shape:
            interpreter.resize_tensor_input(inp["index"], list(chunk.shape))
            with held_stderr():  # LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                interpreter.allocate_tensors()
            shape = chunk.shape
        interpreter.set_tensor(inp["index"], chunk)
        interpreter.invoke()
        chunks.append(np.array(interpreter.get_tensor(out["index"]), dtype=np.float32))
    return np.concatenate(chunks)


def predict_exported(kind: str, path: Path | str, x: np.ndarray) -> np.ndarray:
    """Probabilities of an export file of ``kind`` (see :func:`kind_of`) on raw pixels ``x``."""
    return predict_onnx(path, x) if kind == "onnx" else predict_tflite(path, x)


def parity(kind: str, path: Path, reference: np.ndarray, probs: np.ndarray, y_true: np.ndarray,
           keras_accuracy: float) -> ExportResult:
    """Compare an export's probabilities with Keras' (both (N, C)) and check :data:`TOLERANCE`."""
    diff = float(np.abs(probs.astype(np.float64) - reference).max())
    agree = float((probs.argmax(1) == reference.argmax(1)).mean())
    required = TOLERANCE[kind]
    passed = diff < required.get("max_abs_diff", np.inf) and agree >= required.get("top1_agreement", 0.0)
    return ExportResult(kind=kind, path=str(path), size_bytes=path.stat().st_size, max_abs_diff=diff,
                        top1_agreement=agree, test_accuracy=float((probs.argmax(1) == y_true).mean()),
                        keras_test_accuracy=keras_accuracy, images=len(y_true), passed=passed, required=required)


# ---------------------------------------------------------------- converters


def to_onnx(model, path: Path) -> Path:
    """Write ``model`` as ONNX (tf2onnx, opset :data:`ONNX_OPSET`) with a dynamic batch dimension.

    The input keeps the model's name (``pixels``), float32 (batch, 32, 32, 3) raw 0..255 pixels.
    """
    import logging

    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    shape = (None, *model.inputs[0].shape[1:])
    spec = (tf.TensorSpec(shape, tf.float32, name=model.inputs[0].name),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=ONNX_OPSET, output_path=str(path))
    return path


def _convert_tflite(saved_model: str, out_dir: str, representative: str, modes: list[str]) -> None:
    """Convert a SavedModel to one ``.tflite`` per mode, built-in ops only (run in a subprocess)."""
    import tensorflow as tf

    images = np.load(representative).astype(np.float32)
    for mode in modes:
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if mode != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if mode == "int8":  # full integer: every op int8, float32 in and out (the model contract)
            converter.representative_dataset = lambda: ([images[i:i + 1]] for i in range(len(images)))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        Path(out_dir, artifact_name(kind_of("tflite", mode))).write_bytes(converter.convert())


def to_tflite(model, out_dir: Path, modes: list[str], representative: np.ndarray) -> dict[str, Path]:
    """Write ``model`` as ``.tflite`` files, one per quantization mode, into ``out_dir``.

    The model goes through a SavedModel export and ``TFLiteConverter.from_saved_model``
    in a child process (the converter leaks memory on every call,
    tensorflow#122598). ``int8`` calibrates on ``representative`` (N, 32, 32, 3)
    training images. Returns ``{kind: path}``.

    Raises:
        CifarflowError: the converter failed (its last output lines are quoted).
    """
    saved = out_dir / "saved_model"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    rep = out_dir / "representative.npy"
    np.save(rep, representative)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", __name__, str(saved), str(out_dir), str(rep), *modes],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise CifarflowError(f"TFLite conversion failed: {tail}", "check that the model uses only TFLite built-in ops")
    return {kind_of("tflite", m): out_dir / artifact_name(kind_of("tflite", m)) for m in modes}


# ---------------------------------------------------------------- the command


def _log(results: list[ExportResult], parity_file: Path, name: str, version: str | None, source_run: str) -> str:
    """Log the files and figures to a new export run (or `mlflow run`'s run); returns the run id.

    A new run rather than the training run: a finished run stays as trained,
    and its artifact store may be read-only for whoever exports. The version
    gets one tag per exported kind, ``cifarflow.export.<kind>.run_id``; the
    figures stay in that run (metrics ``<kind>_<figure>`` and ``parity.json``)
    and the local file paths on the machine that exported.
    """
    import mlflow

    from cifarflow import tracking

    if not os.environ.get("MLFLOW_RUN_ID"):
        tracking.use_experiment("cifarflow/export")
    label = f"{name}-v{version}" if version else name
    with mlflow.start_run(run_name=None if os.environ.get("MLFLOW_RUN_ID") else f"export-{label}") as run:
        mlflow.set_tags({"cifarflow.source_run_id": source_run or "", "cifarflow.registered_model": name,
                         "cifarflow.model_version": version or "", "cifarflow.git_commit": tracking.git_commit()})
        for r in results:
            mlflow.log_artifact(r.path, "export")
            mlflow.log_metrics({f"{r.kind}_{k}": float(getattr(r, k)) for k in EXPORT_FIGURES})
        if results:
            mlflow.log_metric("keras_test_accuracy", results[0].keras_test_accuracy)
        mlflow.log_artifact(str(parity_file), "export")
        run_id = run.info.run_id
    if version:
        client = mlflow.MlflowClient()
        for r in results:
            client.set_model_version_tag(name, version, f"cifarflow.export.{r.kind}.run_id", run_id)
    return run_id


def require_tensorflow() -> None:
    """ONNX (tf2onnx) and TFLite conversion trace the Keras model with TensorFlow: check it is the backend.

    Raises:
        CifarflowError: TensorFlow is not installed, or Keras runs on another backend (a model
            trained on JAX or PyTorch exports fine from the TensorFlow backend: the weights load on any).
    """
    import importlib.util

    import keras

    if importlib.util.find_spec("tensorflow") is None:
        raise CifarflowError("ONNX/TFLite export needs TensorFlow, which is not installed (training, evaluate "
                             "and tune on JAX do not)", "pip install -e '.[tensorflow]' and run the export with "
                             "KERAS_BACKEND=tensorflow")
    if keras.backend.backend() != "tensorflow":
        raise CifarflowError(f"ONNX/TFLite export runs on the TensorFlow Keras backend, not "
                             f"{keras.backend.backend()}", "run the export with KERAS_BACKEND=tensorflow (the "
                             "model trained on any backend loads there)")


def export(model_ref: str, formats: list[str], quantize: list[str] | None = None, *, out_dir: Path | None = None,
           data: str | None = None, log: bool = True) -> tuple[list[ExportResult], str | None]:
    """Export a registered version (or a logged model) to ONNX and/or TFLite, verify parity, log the results.

    Each file is made in a scratch folder, run on the whole test set with ONNX
    Runtime or LiteRT, compared with the Keras model (:func:`parity`,
    :data:`TOLERANCE`) and only then moved into ``out_dir``; ``parity.json``
    there holds the figures of every export made into it.

    Args:
        model_ref: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``NAME@ALIAS``
            or a logged model ``models:/m-...``.
        formats: subset of ``onnx``, ``tflite``.
        quantize: TFLite modes (``none`` = float32, ``float16``, ``dynamic``,
            ``int8`` = full integer with float32 input/output); ``["none"]`` when None.
        out_dir: output folder; ``export/<name>/<version>/`` when None.
        data: the test data (default: the training run's ``data_source``);
            its sha256 must match the run's ``cifarflow.dataset_sha256``.
        log: log files and figures to MLflow (a new run in ``cifarflow/export``
            and ``cifarflow.export.<kind>.*`` tags of the version).

    Returns:
        ``(results, export_run_id)``; the run id is None when ``log`` is False.

    Raises:
        CifarflowError: unknown model, bad format/mode, data that differ from
            the run's, a failed conversion, or parity outside the tolerance
            (the failing files are not written); TensorFlow missing or another
            Keras backend (:func:`require_tensorflow`).
    """

    from cifarflow.tracking import refs

    require_tensorflow()
    quantize = list(quantize or ["none"])
    bad = [f for f in formats if f not in FORMATS] + [q for q in quantize if q not in QUANTIZE]
    if bad or not formats:
        raise CifarflowError(f"unknown export format or quantization {bad or formats}",
                             f"use --format {'|'.join(FORMATS)}|all and --quantize {'|'.join(QUANTIZE)}")
    client = refs.mlflow_client()
    if model_ref.startswith("models:/m-"):
        source = refs.resolve_source(model_ref)
        name, version, run_id, uri = source.model_id, None, source.run_id, model_ref
    else:
        ref = refs.resolve_version(model_ref)
        name, version, run_id, uri = ref.name, ref.version, ref.run_id, ref.uri
    out_dir = Path(out_dir or Path("export") / name / (version or ""))
    run = client.get_run(run_id)
    ds = refs.run_test_data(run, data or None)
    model = refs.load_keras(uri)
    x_test = ds.x_test.astype(np.float32)
    from cifarflow.data.pipeline import predict

    reference = predict(model, x_test).astype(np.float64)
    keras_accuracy = float((reference.argmax(1) == ds.y_test).mean())

    out_dir.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".scratch-") as tmp:
        scratch = Path(tmp)
        files: dict[str, Path] = {}
        if "onnx" in formats:
            files["onnx"] = to_onnx(model, scratch / artifact_name("onnx"))
        if "tflite" in formats:
            rng = np.random.default_rng(0)
            pick = rng.choice(len(ds.x_train), size=min(REPRESENTATIVE_IMAGES, len(ds.x_train)), replace=False)
            files.update(to_tflite(model, scratch, quantize, ds.x_train[np.sort(pick)]))
        for kind, path in files.items():
            r = parity(kind, path, reference, predict_exported(kind, path, x_test), ds.y_test, keras_accuracy)
            if r.passed:
                final = out_dir / path.name
                shutil.move(str(path), final)
                r = ExportResult(**{**asdict(r), "path": str(final)})
                results.append(r)
            else:
                failed.append(r)
    parity_file = out_dir / "parity.json"
    previous = json.loads(parity_file.read_text()) if parity_file.is_file() else {}
    previous.update({r.kind: asdict(r) for r in results + failed})
    parity_file.write_text(json.dumps(previous, indent=2))
    run_id_out = _log(results, parity_file, name, version, run_id) if log and results else None
    if failed:
        raise CifarflowError(
            "parity check failed for " + "; ".join(
                f"{r.kind}: max abs diff {r.max_abs_diff:.3g}, top-1 agreement {r.top1_agreement:.4f} "
                f"(required {r.required})" for r in failed),
            f"those files were not written; see {parity_file}")
    return results, run_id_out


if __name__ == "__main__":  # the TFLite converter's child process: SAVED_MODEL OUT_DIR REPRESENTATIVE.npy MODE...
    _convert_tflite(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
