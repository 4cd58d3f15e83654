"""Input pipeline: tf.data batches of raw pixels with Keras-layer augmentation, shuffling, prefetch."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from cifarflow.config import TrainConfig


def augmentation(config: TrainConfig, seed: int = 42, image_size: int = 32) -> keras.Sequential | None:
    """Keras preprocessing layers for the training split, or None when all are off.

    Default CIFAR-10 augmentation (He et al. 2016): translate by up to
    ``crop_padding`` pixels with zero fill (the same distribution as padding 4
    pixels and taking a random 32x32 crop) and a random horizontal flip.
    Options: ``rotation`` (fraction of a full turn), ``shift`` (fraction of the
    size, reflected fill), ``zoom`` (fraction), ``brightness`` (fraction of the
    0..255 range), ``contrast`` (factor). Layers act per image on float32 batches
    of 0..255 pixels and are seeded from ``seed``.
    """
    L = keras.layers
    steps: list[keras.layers.Layer] = []
    if config.crop_padding:
        f = config.crop_padding / image_size
        steps.append(L.RandomTranslation(f, f, fill_mode="constant", interpolation="nearest", seed=seed, name="pad_crop"))
    if config.flip:
        steps.append(L.RandomFlip("horizontal", seed=seed + 1, name="flip"))
    if config.rotation:
        steps.append(L.RandomRotation(config.rotation, fill_mode="reflect", seed=seed + 2, name="rotation"))
    if config.shift:
        steps.append(L.RandomTranslation(config.shift, config.shift, fill_mode="reflect", seed=seed + 3, name="shift"))
    if config.zoom:
        steps.append(L.RandomZoom(config.zoom, fill_mode="reflect", seed=seed + 4, name="zoom"))
    if config.brightness:
        steps.append(L.RandomBrightness(config.brightness, value_range=(0, 255), seed=seed + 5, name="brightness"))
    if config.contrast:
        steps.append(L.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 6, name="contrast"))
    return keras.Sequential(steps, name="augmentation") if steps else None


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    batch_size: int,
    *,
    training: bool,
    augment: keras.Sequential | None = None,
    seed: int = 42,
) -> tf.data.Dataset:
    """Batches of ``(pixels, one_hot)`` for ``model.fit`` / ``evaluate``.

    Args:
        x: uint8 images (N, H, W, 3), values 0..255.
        y: int labels (N,).
        num_classes: width of the one-hot labels.
        batch_size: images per batch (the last batch may be smaller).
        training: shuffle every epoch (seeded) and apply ``augment``.
        augment: layers from :func:`augmentation`, applied per batch.
        seed: shuffle seed.

    Returns:
        A prefetched ``tf.data.Dataset`` of float32 ``(b, H, W, 3)`` pixels on the
        0..255 scale and float32 ``(b, num_classes)`` one-hot labels.
    """
    ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
    if training:
        ds = ds.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def to_float(images, labels):
        return tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)

    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    if training and augment is not None:
        ds = ds.map(lambda i, l: (augment(i, training=True), l), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
