"""The pyfunc of a logged cifarflow Keras model: what `mlflow models serve/predict` and `mlflow.pyfunc.load_model` run.

Self-contained (NumPy, Keras and MLflow only): :func:`cifarflow.tracking.log_keras_model`
copies this file into each logged model's ``code/`` folder as ``cifarflow_serving.py``
and names it the pyfunc loader, so a model predicts the same wherever it is served.

The wrapper takes raw 0..255 RGB pixels (N, 32, 32, 3), refuses NaN, infinite and
out-of-range values (MLflow's INVALID_PARAMETER_VALUE: HTTP 400 from the server) and
predicts without progress output, so `mlflow models predict` writes nothing but JSON.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

PIXEL_RANGE = (0, 255)
LOADER_MODULE = "cifarflow_serving"  # this file's name inside a logged model's code/ folder


def pixel_problem(x) -> str | None:
    """What is wrong with ``x`` as raw pixels, or None when every value is a finite number in 0..255.

    Args:
        x: array-like (N, ...) of pixel values (any numeric dtype).

    Returns:
        A one-line description naming the count of bad values, the first one
        and its image index, or None.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        return f"pixels must be numbers in 0..255, got {x.dtype} values"
    low, high = PIXEL_RANGE
    with np.errstate(invalid="ignore"):
        bad = (x < low) | (x > high)
        if x.dtype.kind == "f":
            bad |= ~np.isfinite(x)
    if not bad.any():
        return None
    image = int(np.argwhere(bad)[0][0]) if x.ndim > 1 else 0
    first = x[bad].flat[0]
    return f"{int(bad.sum())} pixel value(s) not in 0..255 (first: {float(first)} in image {image})"


@contextlib.contextmanager
def held_stderr():
    """Hold back what C/C++ code writes to stderr (fd 2) inside the block; replay it if the block raises.

    For libraries that print start-up chatter from native code, which Python's
    ``warnings`` and ``logging`` cannot filter (TensorFlow's absl lines, LiteRT's
    "Created TensorFlow Lite XNNPACK delegate").
    """
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}  # Keras backend -> its module = pip extra


def keras_backend_name() -> str:
    """The Keras backend Keras will use, read without importing Keras: ``$KERAS_BACKEND``, else the
    ``backend`` of ``$KERAS_HOME/keras.json`` (``~/.keras/keras.json``), else ``tensorflow``."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        import json

        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend") or "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def require_backend() -> None:
    """Check that the library of the Keras backend in use is installed, before Keras is imported.

    Raises:
        CifarflowError: it is not (Keras would fail with a traceback deep inside its import).
    """
    import importlib.util

    from cifarflow.errors import CifarflowError

    backend = keras_backend_name()
    module = BACKEND_MODULES.get(backend)
    if module and importlib.util.find_spec(module) is None:
        other = "set KERAS_BACKEND=jax (installed with pip install -e '.[jax]')" if backend != "jax" else \
            "set KERAS_BACKEND=tensorflow (pip install -e '.[tensorflow]')"
        raise CifarflowError(f"the Keras backend is {backend} but {module} is not installed",
                             f"pip install -e '.[{module}]', or {other}")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up lines (absl, oneDNN, CUDA probes) held back (:func:`held_stderr`).

    TF 2.21 prints them before ``TF_CPP_MIN_LOG_LEVEL`` takes effect.
    ``TF_CPP_MIN_LOG_LEVEL`` defaults to 3 afterwards (set it to 0 to see
    TensorFlow's C++ log). A no-op when TensorFlow is already imported or Keras
    runs on another backend.
    """
    if "tensorflow" in sys.modules or keras_backend_name() != "tensorflow":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with held_stderr():
        import tensorflow  # noqa: F401


class KerasClassifier:
    """What ``mlflow.pyfunc.load_model`` wraps for a cifarflow Keras model."""

    def __init__(self, model) -> None:
        self.model = model

    def get_raw_model(self):
        """The Keras model."""
        return self.model

    def predict(self, data, params=None) -> np.ndarray:
        """Softmax probabilities (N, C) float32 of raw pixels ``data`` (N, 32, 32, 3), silently.

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE for NaN, infinite or
                out-of-range pixels.
        """
        from mlflow.exceptions import MlflowException

        if hasattr(data, "to_numpy"):  # a DataFrame
            data = data.to_numpy()
        problem = pixel_problem(data)
        if problem:
            raise MlflowException.invalid_parameter_value(f"{problem}: the model takes raw RGB pixels 0..255")
        x = np.asarray(data, dtype=np.float32)
        return np.asarray(self.model.predict(x, batch_size=256, verbose=0), dtype=np.float32)


def _load_pyfunc(path: str) -> KerasClassifier:
    """MLflow's pyfunc loader: the Keras model that ``mlflow.keras`` saved in the model folder ``path``."""
    import_tensorflow_quietly()
    import keras
    import yaml

    with open(os.path.join(path, "MLmodel")) as f:
        data = yaml.safe_load(f)["flavors"]["keras"].get("data", "data")
    return KerasClassifier(keras.saving.load_model(os.path.join(path, data, "model.keras"), compile=False))
