"""Residual networks for 32x32 inputs: ResNet-20 (He et al. 2016) and Wide ResNets (Zagoruyko and Komodakis 2016)."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

from cifarflow.models.layers import pixel_input

_INIT = "he_normal"
_WRN_BN_MOMENTUM = 0.9


def _shortcut_a(x, filters: int, stride: int, name: str):
    """Parameter-free shortcut (option A of He et al. 2016): subsample, pad channels with zeros."""
    if stride > 1:
        x = layers.MaxPooling2D(1, strides=stride, name=f"{name}_subsample")(x)
    missing = filters - x.shape[-1]
    if missing > 0:
        zeros = layers.Rescaling(0.0, name=f"{name}_zeros")(x)
        parts = [x] + [zeros] * (missing // x.shape[-1])
        x = layers.Concatenate(name=f"{name}_pad")(parts)
    return x


def build_resnet(
    num_classes: int = 10,
    depth: int = 20,
    base_filters: int = 16,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> keras.Model:
    """ResNet for CIFAR-10 (He et al. 2016, "Deep Residual Learning", section 4.2).

    A 3x3 conv of ``base_filters``, then three stages of n = (depth - 2) / 6
    basic blocks (two 3x3 Conv-BN, ReLU after the addition) with 16, 32, 64
    filters, stride 2 at the start of stages 2 and 3, parameter-free (option A)
    shortcuts, global average pooling and a softmax layer. ResNet-20 (n = 3):
    0.27M params, 8.75% error in the paper.

    Args:
        num_classes: output classes.
        depth: 6n + 2 (20, 32, 44, 56, 110).
        base_filters: filters of the first stage.
        mean, std: per-channel pixel statistics (0..255) for the input normalization.

    Returns:
        ``keras.Model``: raw pixels -> float32 probabilities.

    Raises:
        ValueError: ``depth`` is not 6n + 2.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    inputs, x = pixel_input(mean=mean, std=std)
    x = layers.Conv2D(base_filters, 3, padding="same", use_bias=False, kernel_initializer=_INIT, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage in range(3):
        filters = base_filters * 2**stage
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"stage{stage + 1}_block{block + 1}"
            y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                              kernel_initializer=_INIT, name=f"{name}_conv1")(x)
            y = layers.BatchNormalization(name=f"{name}_bn1")(y)
            y = layers.ReLU(name=f"{name}_relu1")(y)
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=_INIT,
                              name=f"{name}_conv2")(y)
            y = layers.BatchNormalization(name=f"{name}_bn2")(y)
            x = layers.Add(name=f"{name}_add")([_shortcut_a(x, filters, stride, name), y])
            x = layers.ReLU(name=f"{name}_relu2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def build_wrn(
    num_classes: int = 10,
    depth: int = 28,
    width: int = 10,
    dropout: float = 0.3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> keras.Model:
    """Wide ResNet WRN-``depth``-``width`` (Zagoruyko and Komodakis 2016, "Wide Residual Networks").

    A 3x3 conv of 16 filters, then three groups of n = (depth - 4) / 6
    pre-activation wide basic blocks (BN-ReLU-conv3x3, dropout, BN-ReLU-conv3x3)
    with 16k, 32k, 64k filters (k = ``width``), stride 2 at groups 2 and 3,
    1x1 conv shortcuts where the shape changes; final BN-ReLU, global average
    pooling, softmax. WRN-28-10: 36.5M params, 3.89% CIFAR-10 test error
    with dropout 0.3 in the paper; WRN-16-4: 2.7M params. BatchNorm momentum
    0.9 as in the authors' Torch code (momentum 0.1 there): Keras' default 0.99
    leaves the moving statistics stale in short runs, so validation reads chance.

    Args:
        num_classes: output classes.
        depth: 6n + 4 (16, 22, 28, 40).
        width: widening factor k.
        dropout: dropout rate between the two convs of each block, [0, 1).
        mean, std: per-channel pixel statistics (0..255) for the input normalization.

    Returns:
        ``keras.Model``: raw pixels -> float32 probabilities.

    Raises:
        ValueError: ``depth`` is not 6n + 4, or ``width`` < 1.
    """
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40) and width >= 1, got {depth}-{width}")
    n = (depth - 4) // 6
    inputs, x = pixel_input(mean=mean, std=std)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, kernel_initializer=_INIT, name="stem_conv")(x)
    for group in range(3):
        filters = 16 * width * 2**group
        for block in range(n):
            stride = 2 if group > 0 and block == 0 else 1
            name = f"group{group + 1}_block{block + 1}"
            pre = layers.BatchNormalization(momentum=_WRN_BN_MOMENTUM, name=f"{name}_bn1")(x)
            pre = layers.ReLU(name=f"{name}_relu1")(pre)
            y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                              kernel_initializer=_INIT, name=f"{name}_conv1")(pre)
            y = layers.BatchNormalization(momentum=_WRN_BN_MOMENTUM, name=f"{name}_bn2")(y)
            y = layers.ReLU(name=f"{name}_relu2")(y)
            if dropout:
                y = layers.Dropout(dropout, name=f"{name}_dropout")(y)
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=_INIT,
                              name=f"{name}_conv2")(y)
            if x.shape[-1] != filters or stride != 1:
                x = layers.Conv2D(filters, 1, strides=stride, use_bias=False, kernel_initializer=_INIT,
                                  name=f"{name}_shortcut")(pre)
            x = layers.Add(name=f"{name}_add")([x, y])
    x = layers.BatchNormalization(momentum=_WRN_BN_MOMENTUM, name="final_bn")(x)
    x = layers.ReLU(name="final_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"wrn-{depth}-{width}")
