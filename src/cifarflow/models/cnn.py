"""Custom CNN baseline: VGG-style conv blocks with BatchNorm, max-pool and dropout."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

from cifarflow.models.layers import pixel_input


def build_cnn(
    num_classes: int = 10,
    width: float = 1.0,
    depth: int = 2,
    blocks: int = 3,
    base_filters: int = 64,
    dropout: float = 0.3,
    dense_units: int = 256,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> keras.Model:
    """Build the custom CNN baseline.

    ``blocks`` conv blocks; block i has ``depth`` 3x3 convs of
    ``round(width * base_filters * 2**i)`` filters, each Conv-BatchNorm-ReLU,
    then 2x2 max-pool and dropout. Then global average pooling, a dense ReLU
    layer of ``dense_units`` (skipped when 0), dropout and a float32 softmax.
    The default is 64/128/256 filters with two convs each (about 1.2M params).

    Args:
        num_classes: output classes.
        width: multiplier on the filter counts (0.5 gives 32/64/128).
        depth: convs per block (>= 1).
        blocks: number of blocks (>= 1; each halves the resolution).
        base_filters: filters of the first block at ``width=1``.
        dropout: dropout rate after each block and before the classifier, [0, 1).
        dense_units: units of the dense layer of the head; 0 for none.
        mean, std: per-channel pixel statistics (0..255 scale) for the input
            normalization; CIFAR-10's when None.

    Returns:
        A ``keras.Model`` mapping float32 ``(batch, 32, 32, 3)`` raw pixels
        (0..255) to float32 ``(batch, num_classes)`` softmax probabilities.

    Raises:
        ValueError: non-positive width/depth/blocks or dropout outside [0, 1).
    """
    if width <= 0 or depth < 1 or blocks < 1 or not 0 <= dropout < 1:
        raise ValueError(f"bad cnn parameters: width={width} depth={depth} blocks={blocks} dropout={dropout}")
    inputs, x = pixel_input(mean=mean, std=std)
    for b in range(blocks):
        filters = max(1, round(width * base_filters * 2**b))
        for c in range(depth):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{b + 1}_conv{c + 1}")(x)
            x = layers.BatchNormalization(name=f"block{b + 1}_bn{c + 1}")(x)
            x = layers.ReLU(name=f"block{b + 1}_relu{c + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"block{b + 1}_pool")(x)
        x = layers.Dropout(dropout, name=f"block{b + 1}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if dense_units:
        x = layers.Dense(dense_units, activation="relu", name="head_dense")(x)
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="cnn")
