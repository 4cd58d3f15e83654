"""Pull a registered version for deployment: the model file (Keras, MLflow, ONNX or TFLite) and its ``model_card.json``."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from cifarflow.deploy.export import EXPORT_FIGURES, artifact_name, kind_of
from cifarflow.deploy.registry import CARD_METRICS
from cifarflow.errors import CifarflowError
from cifarflow.serving import IMAGE_COLUMN, MAX_IMAGES
from cifarflow.tracking.refs import download_run_artifact, load_keras, mlflow_client, VersionRef, resolve_version


# The pyfunc's second input (``--format mlflow``): docs/registry-and-deployment.md, "Images in, labels out".
IMAGE_INPUT = {
    "name": IMAGE_COLUMN, "type": "DataFrame column", "max_rows": MAX_IMAGES,
    "values": "encoded images (JPEG, PNG; any size and mode) as bytes, or base64 strings in JSON "
              "(dataframe_split / dataframe_records)",
    "decoding": "inside the model, as the training data: Pillow, converted to RGB, bilinear resize to 32x32",
    "output": "one row per image: label (class name), probability, then one probability column per class",
    "signature": "none logged: one MLflow schema cannot admit both inputs; the model checks its input (HTTP 400)",
}


def model_card(ref: VersionRef, fmt: str, file_name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``model_card.json`` content of a pulled version: classes, input and output spec, metrics, provenance."""
    client = mlflow_client()
    mv = client.get_model_version(ref.name, ref.version)
    run = client.get_run(ref.run_id) if ref.run_id else None
    classes: list[str] = []
    if run is not None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                classes = json.loads(download_run_artifact(run.info.run_id, "classes.json", Path(tmp)).read_text())
            except (MlflowException, OSError):
                classes = []
    metrics = run.data.metrics if run else {}
    return {
        "name": ref.name,
        "version": ref.version,
        "aliases": list(mv.aliases),
        "format": fmt,
        "file": file_name,
        "classes": classes,
        "input": {"name": "pixels", "shape": [None, 32, 32, 3], "dtype": "float32", "layout": "NHWC",
                  "channels": "RGB", "range": [0, 255]},
        "output": {"shape": [None, len(classes) or None], "dtype": "float32",
                   "meaning": "softmax probabilities, column i is classes[i]"},
        **({"image_input": IMAGE_INPUT} if fmt == "mlflow" else {}),
        "preprocessing": "none: feed raw 0..255 RGB pixels as decoded from the image files, 32x32 "
                         "(Pillow, converted to RGB, bilinear resize: cifarflow.serving.decode_image); "
                         "scaling and normalization are inside the model",
        "metrics": {k: metrics[k] for k in CARD_METRICS if k in metrics},
        "dataset_sha256": mv.tags.get("cifarflow.dataset_sha256"),
        "source_run_id": ref.run_id,
        "model_uri": mv.tags.get("cifarflow.model_uri") or mv.source,
        "registered_uri": ref.uri,
        **(extra or {}),
    }


def pull(ref: str, fmt: str, dest: Path, quantize: str = "none") -> Path:
    """Download a registered version for deployment into ``dest`` with a ``model_card.json``.

    Args:
        ref: ``NAME@ALIAS``, ``NAME/VERSION`` or ``NAME`` (its champion).
        fmt: ``keras`` (the logged model saved as ``model.keras``), ``mlflow``
            (the MLflow model folder ``model/``, any flavor: ``mlflow models
            serve -m`` it, or load it with ``mlflow.pyfunc.load_model``), ``onnx`` or
            ``tflite`` (the files made by ``cifarflow export`` for this version).
        dest: output folder (created).
        quantize: which TFLite variant (``none``, ``float16``, ``dynamic``, ``int8``).

    Returns:
        The path of the model file.

    Raises:
        CifarflowError: unknown version, or no export of that format for it.
    """
    version = resolve_version(ref)
    client = mlflow_client()
    mv = client.get_model_version(version.name, version.version)
    dest.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if fmt == "keras":
        model = load_keras(version.uri)
        target = dest / "model.keras"
        model.save(target)
    elif fmt == "mlflow":
        target = dest / "model"
        if target.exists():
            shutil.rmtree(target)
        with tempfile.TemporaryDirectory() as tmp:  # a private copy, see load_keras
            shutil.copytree(mlflow.artifacts.download_artifacts(version.uri, dst_path=tmp), target)
    else:
        kind = kind_of(fmt, quantize)
        export_run = mv.tags.get(f"cifarflow.export.{kind}.run_id")
        if not export_run:
            raise CifarflowError(
                f"{version.name} v{version.version} has no {kind} export",
                f"run: cifarflow export {version.uri} --format {fmt}" + (f" --quantize {quantize}" if fmt == "tflite" else ""))
        name = artifact_name(kind)
        with tempfile.TemporaryDirectory() as tmp:
            got = download_run_artifact(export_run, f"export/{name}", Path(tmp))
            target = dest / name
            shutil.copyfile(got, target)
        figures = client.get_run(export_run).data.metrics
        extra["export"] = {"run_id": export_run, **{
            k: int(figures[f"{kind}_{k}"]) if k == "size_bytes" else figures[f"{kind}_{k}"]
            for k in EXPORT_FIGURES if f"{kind}_{k}" in figures}}
    card = model_card(version, fmt, target.name, extra)
    (dest / "model_card.json").write_text(json.dumps(card, indent=2))
    return target
