"""Shared model layers: the raw-pixel input stem every builder starts with."""

from __future__ import annotations

from typing import Sequence

import keras

# Per-channel mean and std of the CIFAR-10 training pixels (0..255 scale).
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)


def pixel_input(
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Model input for raw RGB pixels and its normalized view.

    Args:
        image_size: height and width of the input images, in pixels.
        mean, std: per-channel statistics on the 0..255 scale (3 values each);
            CIFAR-10's when None.

    Returns:
        ``(inputs, x)``: a float32 ``(batch, image_size, image_size, 3)`` input
        taking values 0..255 (uint8 arrays are cast), and the tensor
        ``(inputs - mean) / std``.
    """
    mean = list(mean if mean is not None else CIFAR10_MEAN)
    std = list(std if std is not None else CIFAR10_STD)
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name="pixels")
    x = keras.layers.Normalization(
        mean=mean, variance=[s * s for s in std], name="normalize"
    )(inputs)
    return inputs, x
