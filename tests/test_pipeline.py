"""Input pipeline: shapes, dtypes, value range, augmentation on train only, seeded shuffling."""

from __future__ import annotations

import numpy as np

from cifarflow import config
from cifarflow.data import pipeline


def _arrays(n=40, classes=4):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8), np.arange(n) % classes


def test_batches_are_float_pixels_and_one_hot_labels():
    x, y = _arrays()
    cfg = config.resolve("cnn_small")
    ds = pipeline.make_dataset(x, y, 4, 16, training=True, augment=pipeline.augmentation(cfg), seed=1)
    batches = list(ds.as_numpy_iterator())
    assert [b[0].shape for b in batches] == [(16, 32, 32, 3), (16, 32, 32, 3), (8, 32, 32, 3)]
    images, labels = batches[0]
    assert images.dtype == np.float32 and labels.dtype == np.float32 and labels.shape == (16, 4)
    assert images.min() >= 0 and images.max() <= 255
    np.testing.assert_array_equal(labels.sum(axis=1), 1.0)


def test_evaluation_batches_are_the_images_unchanged_and_in_order():
    x, y = _arrays()
    images, labels = next(pipeline.make_dataset(x, y, 4, 40, training=False).as_numpy_iterator())
    np.testing.assert_array_equal(images, x.astype(np.float32))
    np.testing.assert_array_equal(labels.argmax(1), y)


def test_training_and_evaluation_datasets_run_without_tf_data_autotuning():
    """With tf.data's autotuning thread on, each epoch on the 2-core CPU ended only at the thread's next
    wake-up (10 ms x (2^n - 1) after it began: 14.6 s epochs took 20.47 s at random; bench/README.md)."""
    x, y = _arrays()
    for training in (True, False):
        ds = pipeline.make_dataset(x, y, 4, 16, training=training, seed=1)
        assert ds.options().autotune.enabled is False, training
        assert sum(len(b[1]) for b in ds.as_numpy_iterator()) == len(y)  # every image still comes


def test_scoring_predicts_through_a_dataset_without_tf_data_autotuning():
    """``model.predict`` on a NumPy array autotunes its own tf.data pipeline and so waits for the
    thread's next wake-up: 10,000 images scored in 5.92 s instead of 5.27 s (bench/predict_overhead.py).
    TTA scoring (``predict_probs``) and the export's parity reference go through ``pipeline.predict``."""
    import keras
    import tensorflow as tf

    from cifarflow.evaluation.metrics import predict_probs

    x, _ = _arrays(37)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    fed = []
    predict = model.predict
    model.predict = lambda data, **kw: fed.append(data) or predict(data, **kw)
    expected = predict(x.astype(np.float32), batch_size=16, verbose=0)
    np.testing.assert_allclose(pipeline.predict(model, x.astype(np.float32), batch_size=16), expected, rtol=1e-6)
    flip = predict_probs(model, x, tta="flip", batch_size=16)
    mirrored = predict(x[:, :, ::-1].astype(np.float32), batch_size=16, verbose=0)
    np.testing.assert_allclose(flip, (expected + mirrored) / 2, rtol=1e-6)
    assert len(fed) == 3
    for data in fed:
        assert isinstance(data, tf.data.Dataset) and data.options().autotune.enabled is False


def test_default_augmentation_is_crop_and_flip_and_changes_images():
    cfg = config.resolve("cnn_small")
    aug = pipeline.augmentation(cfg, seed=3)
    assert [l.name for l in aug.layers] == ["pad_crop", "flip"]
    x, _ = _arrays(8)
    out = np.asarray(aug(x.astype(np.float32), training=True))
    assert out.shape == x.shape
    assert not np.array_equal(out, x)
    # each output is its input shifted by at most 4 pixels each way (zero fill), maybe mirrored
    def shifted(img, dy, dx):
        moved = np.zeros_like(img)
        moved[max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)] = img[max(-dy, 0):32 + min(-dy, 0),
                                                                            max(-dx, 0):32 + min(-dx, 0)]
        return moved

    moves = []
    for xi, oi in zip(x.astype(np.float32), out):
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) for img in (xi, xi[:, ::-1])
                 if np.array_equal(oi, shifted(img, dy, dx))]
        assert found, "not a crop of at most 4 pixels of its input"
        moves.append(found[0])
    assert any(m != (0, 0) for m in moves)  # and the crops do move


def test_optional_augmentations_and_none():
    cfg = config.resolve("cnn_small", {"rotation": 0.05, "shift": 0.1, "zoom": 0.1, "brightness": 0.2, "contrast": 0.2})
    names = [l.name for l in pipeline.augmentation(cfg).layers]
    assert names == ["pad_crop", "flip", "rotation", "shift", "zoom", "brightness", "contrast"]
    off = config.resolve("cnn_small", {"crop_padding": 0, "flip": False})
    assert pipeline.augmentation(off) is None


def test_shuffle_is_seeded():
    x, y = _arrays()

    def first_pixels(seed):
        ds = pipeline.make_dataset(x, y, 4, 40, training=True, seed=seed)
        return next(ds.as_numpy_iterator())[0][:, 0, 0, 0]

    np.testing.assert_array_equal(first_pixels(5), first_pixels(5))
    assert not np.array_equal(first_pixels(5), first_pixels(6))
    assert not np.array_equal(first_pixels(5), x[:, 0, 0, 0].astype(np.float32))
    np.testing.assert_array_equal(np.sort(first_pixels(5)), np.sort(x[:, 0, 0, 0].astype(np.float32)))


def test_an_epoch_is_a_function_of_seed_and_epoch_so_a_fresh_pipeline_resumes_it():
    """Order, augmentation (RandAugment included) and MixUp/CutMix of epoch k are the same on a fresh
    pipeline whose clock says k (a resumed run) as on the k-th iteration of one that ran from epoch 0."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (48, 8, 8, 3)).astype(np.uint8), np.arange(48) % 4
    cfg = config.resolve("cnn_small", {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "randaugment_ops": 1})

    def make(clock):
        return pipeline.make_dataset(x, y, 4, 16, training=True, augment=pipeline.augmentation(cfg, image_size=8),
                                     mix=pipeline.mixing(cfg), seed=3, clock=clock)

    ds = make(pipeline.EpochClock())
    assert ds.cardinality() == 3
    epochs = [list(ds.as_numpy_iterator()) for _ in range(3)]  # without fit, each iteration is the next epoch
    clock = pipeline.EpochClock()
    resumed = make(clock)
    clock.on_epoch_begin(2)  # as fit(initial_epoch=2) does
    for (a, la), (b, lb) in zip(epochs[2], resumed.as_numpy_iterator(), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(epochs[1][0][0], epochs[2][0][0])  # and each epoch draws anew
    assert not np.array_equal(epochs[1][0][1], epochs[2][0][1])


def test_one_batch_repeated_feeds_the_same_float_batch_forever_without_autotuning():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    y = np.array([0, 3, 9, 3])
    ds = pipeline.one_batch_repeated(x, y)
    assert ds.options().autotune.enabled is False
    batches = list(ds.take(3).as_numpy_iterator())
    assert len(batches) == 3
    for xb, yb in batches:
        assert xb.dtype == np.float32 and yb.dtype == np.float32 and yb.shape == (4, 10)
        np.testing.assert_array_equal(xb, x.astype(np.float32))
        np.testing.assert_array_equal(yb.argmax(1), y)
