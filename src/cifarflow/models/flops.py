"""Forward FLOPs per image of a Keras model, counted from its layers' shapes."""

from __future__ import annotations

import math

import keras


def _macs(layer) -> int:
    """Multiply-accumulates of one image through ``layer`` (convolutions and dense layers only)."""
    kind = layer.__class__.__name__
    if kind == "Dense":
        return int(layer.kernel.shape[0] * layer.kernel.shape[1] * math.prod(layer.output.shape[1:-1] or (1,)))
    kernel = getattr(layer, "kernel", None)
    if kernel is not None and len(kernel.shape) == 4:
        # Conv2D (kernel (kh, kw, in / groups, out)), DepthwiseConv2D ((kh, kw, in, multiplier): each of
        # the in * multiplier outputs reads kh * kw values) and conv-like layers such as PatchWhitening
        return int(math.prod(kernel.shape) * math.prod(layer.output.shape[1:3]))
    return 0


def flops_per_image(model: keras.Model) -> int:
    """Forward FLOPs (2 per multiply-accumulate) of one image through ``model``'s
    convolution and dense layers, nested models included.

    Normalization, activations, pooling and BatchNorm are left out (a few percent
    at most for CNNs). Training costs about 3x this per image (forward plus two
    backward matmuls), the usual estimate behind "training GFLOP/s".

    Returns:
        FLOPs per image, an int.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += flops_per_image(layer)
        else:
            total += 2 * _macs(layer)
    return total
