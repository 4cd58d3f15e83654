"""MixUp, CutMix, RandAugment and test-time augmentation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from scipy import stats

from cifarflow import config
from cifarflow.evaluation import metrics
from cifarflow.data import pipeline


def one_hot_batch(n=64):
    """n images of constant value i, each its own class: mixing is readable off the labels."""
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 32, 32, 3)).copy()
    return images, np.eye(n, dtype=np.float32)


def mix(layer, images, labels):
    out = layer({"images": images, "labels": labels}, training=True)
    return np.asarray(out["images"]), np.asarray(out["labels"])


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_label_mass_sums_to_one_and_is_seeded(kind):
    images, labels = one_hot_batch()
    make = (lambda: pipeline.MixUp(0.4, seed=3)) if kind == "mixup" else (lambda: pipeline.CutMix(1.0, seed=3))
    x1, y1 = mix(make(), images, labels)
    x2, y2 = mix(make(), images, labels)
    np.testing.assert_allclose(y1.sum(axis=1), 1.0, atol=1e-5)
    assert (y1 >= 0).all() and (y1 < 1).any()
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("kind, alpha", [("mixup", 0.2), ("mixup", 1.0), ("cutmix", 1.0)])
def test_mixing_coefficient_follows_beta(kind, alpha):
    """Own-label weight lambda of each mixed image ~ Beta(alpha, alpha) (KS test)."""
    lambdas = []
    for seed in range(40):
        images, labels = one_hot_batch()
        layer = pipeline.MixUp(alpha, seed=seed) if kind == "mixup" else pipeline.CutMix(alpha, seed=seed)
        _, mixed = mix(layer, images, labels)
        own = np.diag(mixed)
        partner_is_other = (mixed > 1e-6).sum(axis=1) == 2
        lambdas.append(own[partner_is_other])
    lam = np.concatenate(lambdas)
    if kind == "cutmix":  # box areas are whole pixels: compare on a 1/1024 grid
        lam = np.clip(lam, 1e-3, 1 - 1e-3)
    assert len(lam) > 1000
    assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).statistic < 0.06


def test_mixup_images_are_mixed_with_the_label_weights():
    images, labels = one_hot_batch(8)
    x, y = mix(pipeline.MixUp(1.0, seed=0), images, labels)
    np.testing.assert_allclose(x[:, 0, 0, 0], y @ np.arange(8, dtype=np.float32), atol=1e-3)


def test_mix_prob_leaves_the_other_images_alone():
    images, labels = one_hot_batch(256)
    _, none = mix(pipeline.MixUp(1.0, probability=0.0, seed=1), images, labels)
    np.testing.assert_array_equal(none, labels)
    _, half = mix(pipeline.MixUp(1.0, probability=0.5, seed=1), images, labels)
    untouched = (np.abs(half - labels).max(axis=1) < 1e-6).mean()
    assert 0.35 < untouched < 0.65
    _, cut = mix(pipeline.CutMix(1.0, probability=0.0, seed=1), images, labels)
    np.testing.assert_array_equal(cut, labels)


def test_recipe_switches_and_pipeline_gives_soft_labels_that_sum_to_one():
    cfg = config.resolve("cnn_small", {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mix_prob": 0.8,
                                       "label_smoothing": 0.1})
    layers = pipeline.mixing(cfg)
    assert [l.name for l in layers] == ["mixup", "cutmix"] and layers[0].probability == pytest.approx(0.4)
    assert pipeline.mixing(config.resolve("cnn_small")) == []
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 32, 32, 3)).astype(np.uint8), np.arange(64) % 10
    ds = pipeline.make_dataset(x, y, 10, 32, training=True, augment=pipeline.augmentation(cfg), mix=layers)
    for _, labels in ds.as_numpy_iterator():
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
        assert (labels.max(axis=1) < 1).any()
    # label smoothing composes with soft labels: the target becomes y * (1 - ls) + ls / C
    soft, pred = np.array([[0.7, 0.3, 0.0]]), np.array([[0.6, 0.3, 0.1]])
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(soft, pred)
    by_hand = keras.losses.CategoricalCrossentropy()(soft * 0.9 + 0.1 / 3, pred)
    assert float(smoothed) == pytest.approx(float(by_hand), rel=1e-5)


def test_randaugment_option():
    cfg = config.resolve("cnn_small", {"randaugment_ops": 2, "randaugment_magnitude": 0.5})
    aug = pipeline.augmentation(cfg)
    assert aug.layers[-1].name == "randaugment"
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    out = np.asarray(aug(x, training=True))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, x)


def test_flip_tta_averages_image_and_mirror():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(seed=0))(x)
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8) / 8
    plain = metrics.predict_probs(model, images)
    mirrored = model.predict(images[:, :, ::-1].astype(np.float32), verbose=0)
    tta = metrics.predict_probs(model, images, tta="flip")
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-6)
    assert not np.allclose(tta, plain)
    with pytest.raises(ValueError, match="unknown tta"):
        metrics.predict_probs(model, images, tta="crops")
