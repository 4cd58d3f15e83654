"""Plain CNNs without shortcuts: the 5-layer CNN (simple5) and VGG-10."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

from cifarflow.models.layers import pixel_input


def build_simple5(
    num_classes: int = 10,
    filters: int = 32,
    dense_units: int = 64,
    dropout: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> keras.Model:
    """The 5-layer CNN of the classic Keras/TensorFlow CIFAR-10 tutorial.

    conv(3x3, ``filters``)-ReLU, max-pool, conv(3x3, 2*``filters``)-ReLU,
    max-pool, flatten, dense(``dense_units``)-ReLU, dropout, softmax. With the
    defaults: 0.28M params.

    Args:
        num_classes: output classes.
        filters: filters of the first conv (the second has twice as many).
        dense_units: units of the hidden dense layer.
        dropout: dropout rate before the classifier, in [0, 1).
        mean, std: per-channel pixel statistics (0..255) for the input normalization.

    Returns:
        ``keras.Model``: float32 ``(batch, 32, 32, 3)`` raw pixels -> float32
        ``(batch, num_classes)`` probabilities.
    """
    inputs, x = pixel_input(mean=mean, std=std)
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(2 * filters, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="simple5")


def build_vgg10(
    num_classes: int = 10,
    filters: int = 32,
    dense_units: int = 64,
    dropout: float = 0.2,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> keras.Model:
    """A VGG-style net (Simonyan and Zisserman 2015) scaled to CIFAR-10.

    Three blocks of two 3x3 Conv-BN-ReLU (``filters``, 2x, 4x), each followed
    by 2x2 max-pool and dropout; flatten, dense(``dense_units``)-ReLU, dropout,
    softmax: 6 conv + 3 pool + 1 hidden dense layers. With the defaults: 0.42M params.

    Args:
        num_classes: output classes.
        filters: filters of the first block.
        dense_units: units of the hidden dense layer.
        dropout: dropout rate after each block and before the classifier.
        mean, std: per-channel pixel statistics (0..255) for the input normalization.

    Returns:
        ``keras.Model``: raw pixels -> float32 probabilities.
    """
    inputs, x = pixel_input(mean=mean, std=std)
    for b in range(3):
        for c in range(2):
            x = layers.Conv2D(filters * 2**b, 3, padding="same", use_bias=False, name=f"block{b + 1}_conv{c + 1}")(x)
            x = layers.BatchNormalization(name=f"block{b + 1}_bn{c + 1}")(x)
            x = layers.ReLU(name=f"block{b + 1}_relu{c + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"block{b + 1}_pool")(x)
        x = layers.Dropout(dropout, name=f"block{b + 1}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="vgg10")
