"""The pyfunc of a logged cifarflow Keras model: what `mlflow models serve/predict` and `mlflow.pyfunc.load_model` run.

Self-contained (NumPy, Keras and MLflow only): :func:`cifarflow.tracking.log_keras_model`
copies this file into each logged model's ``code/`` folder as ``cifarflow_serving.py``
and names it the pyfunc loader, so a model predicts the same wherever it is served.

The wrapper takes two inputs (:func:`model_input`) and predicts without progress output,
so `mlflow models predict` writes nothing but JSON:

- raw 0..255 RGB pixels (N, 32, 32, 3), answered with the softmax probabilities (N, C)
  float32; NaN, infinite and out-of-range values are refused;
- a DataFrame with a column ``image`` of encoded images (JPEG, PNG, any size and mode;
  raw bytes, or base64 strings as JSON carries them), decoded by :func:`decode_image`,
  the function the training data path decodes its files with, and answered with a
  DataFrame (:func:`prediction_table`): ``label``, ``probability``, one column per class.

Refused input raises MLflow's INVALID_PARAMETER_VALUE (HTTP 400 from the server) with
one line naming the problem (and the row of an image that does not decode).
MLflow signatures are one schema, so no signature can hold both inputs: the model is
logged without one (see :func:`cifarflow.tracking.log_keras_model`) and checks its
input here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import sys

import numpy as np

PIXEL_RANGE = (0, 255)
LOADER_MODULE = "cifarflow_serving"  # this file's name inside a logged model's code/ folder
IMAGE_SIZE = 32  # side in pixels of the images every model takes; encoded images of any size are resized to it
IMAGE_COLUMN = "image"  # the DataFrame column of encoded images
MAX_IMAGES = 1024  # encoded images one predict call (one HTTP request) decodes at most; more: INVALID_PARAMETER_VALUE
PREDICT_BATCH = 256  # images per forward pass
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # also the class names of models logged before their class names were recorded (10 outputs)


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


class ImageSizeError(ValueError):
    """An image that is not 32x32 where resizing was not asked for; ``size`` is ``"WxH"``."""

    def __init__(self, size: str) -> None:
        self.size = size
        super().__init__(f"{size} pixels, not {IMAGE_SIZE}x{IMAGE_SIZE}")


def decode_image(image, *, resize: bool = True) -> np.ndarray:
    """Decode one encoded image as the models take it: the one decoder of training data and served images.

    Pillow opens it (JPEG, PNG, ...), it is converted to RGB (grayscale, RGBA,
    palette and CMYK images alike) and, when not 32x32, resized with bilinear
    interpolation (``PIL.Image.Resampling.BILINEAR``).

    Args:
        image: the encoded file's bytes, a path, or a binary file object.
        resize: resize images of another size; else raise :class:`ImageSizeError`.

    Returns:
        uint8 array (32, 32, 3), RGB, values 0..255.

    Raises:
        ImageSizeError: not 32x32 and ``resize`` is false.
        ValueError: not a readable image (the message is one line).
    """
    from PIL import Image

    source = io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else image
    try:
        with Image.open(source) as im:
            im.load()
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                if not resize:
                    raise ImageSizeError(f"{im.size[0]}x{im.size[1]}")
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except ImageSizeError:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for broken files
        raise ValueError(" ".join(f"not a readable image ({type(exc).__name__}: {exc})".split())) from None


def image_bytes(value) -> bytes:
    """The encoded image in one cell of the ``image`` column: raw bytes as given, or a base64 string
    decoded (whitespace and a ``data:image/...;base64,`` prefix allowed).

    Raises:
        ValueError: neither bytes nor a base64 string.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        text = "".join(value.split())
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64: send the image file's bytes base64-encoded") from None
    raise ValueError(f"a {type(value).__name__}, not bytes or a base64 string")


def _invalid(message: str):
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(" ".join(message.split()))


def model_input(data) -> tuple[np.ndarray, bool]:
    """The pixels a pyfunc predicts on, from either input it takes; ``(pixels, images)``.

    Args:
        data: a DataFrame with a column ``image`` (:data:`IMAGE_COLUMN`) of
            encoded images (bytes or base64 strings, see :func:`image_bytes`),
            at most :data:`MAX_IMAGES` rows; or raw RGB pixels 0..255, an
            array-like (or a DataFrame of them) of shape (N, 32, 32, 3).

    Returns:
        float32 pixels (N, 32, 32, 3), and whether they came from encoded images
        (then the pyfunc answers a :func:`prediction_table`).

    Raises:
        MlflowException: INVALID_PARAMETER_VALUE (HTTP 400) with one line: an
            empty image batch, more than :data:`MAX_IMAGES` images, a cell that
            is no image (naming its row), pixels of another shape, or NaN,
            infinite or out-of-range pixel values.
    """
    columns = getattr(data, "columns", None)
    if columns is not None and IMAGE_COLUMN in columns:
        values = list(data[IMAGE_COLUMN])
        if not values:
            raise _invalid(f"empty batch: no row in column '{IMAGE_COLUMN}' (send one or more encoded images)")
        if len(values) > MAX_IMAGES:
            raise _invalid(f"{len(values)} images in one batch, more than {MAX_IMAGES} "
                           f"(send them in batches of at most {MAX_IMAGES})")
        x = np.empty((len(values), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for row, value in enumerate(values):
            try:
                x[row] = decode_image(image_bytes(value))
            except ValueError as exc:
                raise _invalid(f"row {row} of column '{IMAGE_COLUMN}': {exc} "
                               "(send JPEG or PNG files, base64-encoded in JSON)") from None
        return x.astype(np.float32), True
    if hasattr(data, "to_numpy"):  # a DataFrame of pixels
        data = data.to_numpy()
    problem = pixel_problem(data)
    if problem:
        raise _invalid(f"{problem}: the model takes raw RGB pixels 0..255")
    x = np.asarray(data, dtype=np.float32)
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise _invalid(f"pixels of shape {x.shape}: the model takes raw RGB pixels (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) "
                       f"or a DataFrame column '{IMAGE_COLUMN}' of encoded images")
    return x, False


def class_names_of(model_config: dict | None, num_classes: int) -> list[str]:
    """The class names a logged model recorded (``class_names`` of its pyfunc ``model_config``); for
    models logged before they were recorded, CIFAR-10's names (10 classes) or ``class_<i>``."""
    names = list((model_config or {}).get("class_names") or [])
    if len(names) == num_classes:
        return [str(n) for n in names]
    return list(CIFAR10_CLASSES) if num_classes == len(CIFAR10_CLASSES) else [f"class_{i}" for i in range(num_classes)]


def prediction_table(probs: np.ndarray, class_names):
    """The answer to encoded images: a DataFrame, one row per image, columns ``label`` (the top class's
    name), ``probability`` (its probability) and one probability column per class name.

    Args:
        probs: float probabilities (N, C).
        class_names: C names, name i for column i of ``probs``.
    """
    import pandas as pd

    probs = np.asarray(probs, dtype=np.float32)
    top = probs.argmax(axis=1)
    table = pd.DataFrame({"label": [class_names[i] for i in top], "probability": probs[np.arange(len(probs)), top]})
    return pd.concat([table, pd.DataFrame(probs, columns=list(class_names))], axis=1)


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

    def __init__(self, model, class_names=None) -> None:
        self.model = model
        self.class_names = class_names_of({"class_names": class_names}, int(model.output_shape[-1]))

    def get_raw_model(self):
        """The Keras model."""
        return self.model

    def predict(self, data, params=None):
        """Predict, silently, on either input of :func:`model_input`.

        Returns:
            For raw pixels (N, 32, 32, 3): the softmax probabilities, float32
            array (N, C). For a DataFrame column ``image`` of encoded images: a
            :func:`prediction_table` (``label``, ``probability``, one column per class).

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE for input :func:`model_input` refuses.
        """
        x, images = model_input(data)
        probs = np.asarray(self.model.predict(x, batch_size=PREDICT_BATCH, verbose=0), dtype=np.float32)
        return prediction_table(probs, self.class_names) if images else probs


def _load_pyfunc(path: str, model_config: dict | None = None) -> KerasClassifier:
    """MLflow's pyfunc loader: the Keras model that ``mlflow.keras`` saved in the model folder ``path``,
    with the ``class_names`` of the pyfunc flavor's ``model_config``."""
    import_tensorflow_quietly()
    import keras
    import yaml

    with open(os.path.join(path, "MLmodel")) as f:
        flavors = yaml.safe_load(f)["flavors"]
    data = flavors["keras"].get("data", "data")
    config = model_config or flavors.get("python_function", {}).get("config") or {}  # MLflow's key of model_config
    model = keras.saving.load_model(os.path.join(path, data, "model.keras"), compile=False)
    return KerasClassifier(model, config.get("class_names"))
