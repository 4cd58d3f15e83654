"""The ``fast`` net (airbench94 in Keras): whitening init whitens, identity init, BatchNorm settings, size."""

from __future__ import annotations

import numpy as np
import pytest

import keras

from cifarflow.models.fast import build_fast, initialize_from_data, patch_whitening_kernel, set_partial_identity
from cifarflow.models.flops import flops_per_image


def correlated_images(n=64, size=12, seed=0):
    """Smooth, channel-correlated float images: their 2x2 patches are far from white."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, size + 1, size + 1, 1))
    smooth = (base[:, 1:, 1:] + base[:, :-1, 1:] + base[:, 1:, :-1] + base[:, :-1, :-1]) / 4  # neighbours correlate
    mix = np.array([[1.0, 0.8, 0.6]])
    return smooth * mix + 0.1 * rng.normal(size=(n, size, size, 3))


def test_whitening_init_whitens_its_sample():
    x = correlated_images()
    layer = keras.layers.Conv2D(24, 2, padding="valid")
    layer.build(x.shape)
    before = np.cov(x[:, :2, :2].reshape(len(x), -1), rowvar=False)
    assert np.abs(before - np.diag(np.diag(before))).max() > 0.1  # patches are correlated to begin with
    layer.kernel.assign(patch_whitening_kernel(x, 2, eps=1e-9))
    out = np.asarray(layer(x.astype("float32"))).reshape(-1, 24)
    second_moment = out.T @ out / len(out)  # the init whitens the uncentred patch covariance (airbench94 L249)
    half = second_moment[:12, :12]
    np.testing.assert_allclose(half, np.eye(12), atol=2e-3)
    np.testing.assert_allclose(second_moment[12:, 12:], np.eye(12), atol=2e-3)
    np.testing.assert_allclose(second_moment[:12, 12:], -np.eye(12), atol=2e-3)  # second half is the negation


def test_built_model_whitens_its_init_sample_through_the_whiten_layer():
    # the recipe's path: build_fast + initialize_from_data on raw 0..255 pixels, then the frozen layer's outputs
    # (before its bias and GELU) on every 2x2 patch of that sample have an identity second moment
    x = np.clip(128 + 60 * correlated_images(n=48, size=32, seed=2), 0, 255).astype(np.float32)
    model = build_fast(widths=(8, 8, 8), mean=list(x.mean((0, 1, 2))), std=list(x.std((0, 1, 2))))
    initialize_from_data(model, x, eps=1e-9)
    whiten = model.get_layer("whiten")
    pre = keras.Model(model.inputs, whiten.output)
    out = np.asarray(pre.predict(x, verbose=0)).reshape(-1, 24) - whiten.bias.numpy()
    second_moment = out.T @ out / len(out)
    np.testing.assert_allclose(second_moment[:12, :12], np.eye(12), atol=5e-3)
    assert not whiten.kernel.trainable and whiten.bias.trainable  # frozen kernel, trained bias (airbench94 L230)


def test_whitening_kernel_orders_filters_by_decreasing_eigenvalue():
    x = correlated_images(seed=1)
    kernel = patch_whitening_kernel(x, 2, eps=0.0)
    assert kernel.shape == (2, 2, 3, 24)
    filters = kernel.reshape(12, 24)[:, :12]
    # filter j = v_j / sqrt(lambda_j): its norm is 1/sqrt(lambda_j), increasing as lambda_j decreases
    norms = np.linalg.norm(filters, axis=0)
    assert np.all(np.diff(norms) > 0)


def test_initialize_from_data_feeds_the_normalized_pixels():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 32, 32, 3)).astype(np.float32)
    model = build_fast(widths=(8, 8, 8), mean=[100.0, 110.0, 120.0], std=[50.0, 60.0, 70.0])
    initialize_from_data(model, pixels)
    normalized = (pixels - np.array([100.0, 110.0, 120.0])) / np.array([50.0, 60.0, 70.0])
    np.testing.assert_allclose(model.get_layer("whiten").kernel.numpy(), patch_whitening_kernel(normalized), rtol=1e-3,
                               atol=1e-4)


def test_partial_identity_passes_the_input_through_its_first_channels():
    conv = keras.layers.Conv2D(6, 3, kernel_initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"))
    conv.build((None, 8, 8, 4))
    set_partial_identity(conv)
    kernel = conv.kernel.numpy()
    for o in range(4):
        expected = np.zeros((3, 3, 4))
        expected[1, 1, o] = 1.0
        np.testing.assert_array_equal(kernel[..., o], expected)
    rest = kernel[..., 4:]
    bound = 1 / np.sqrt(3 * 3 * 4)  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(rest).max() <= bound and np.abs(rest).max() > bound / 2


def test_fast_net_matches_airbench94():
    model = build_fast()
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (3, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    bns = [l for l in model.layers if l.__class__.__name__ == "BatchNormalization"]
    assert len(bns) == 6 and all(not b.scale and b.center and b.momentum == 0.6 and b.epsilon == 1e-12 for b in bns)
    convs = [l for l in model.layers if l.__class__.__name__ == "Conv2D" and l.name != "whiten"]
    assert [c.filters for c in convs] == [64, 64, 256, 256, 256, 256] and not any(c.use_bias for c in convs)
    whiten = model.get_layer("whiten")
    assert not whiten.kernel.trainable and whiten.bias.trainable and whiten.kernel.shape == (2, 2, 3, 24)
    assert whiten.padding == "valid" and model.get_layer("block1_conv1").input.shape[1:] == (31, 31, 24)
    assert model.get_layer("logit_scale").scale == pytest.approx(1 / 9)
    assert not model.get_layer("logits").use_bias
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 1_971_352  # airbench94: "about 2M params"
    assert flops_per_image(model) == pytest.approx(0.2363e9, rel=1e-3)  # airbench94: about 0.24 GFLOP forward


def test_flops_count_convs_and_dense():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8 positions * 3*3*3*4 MACs
    x = keras.layers.DepthwiseConv2D(3, padding="valid")(x)  # 6*6 * 3*3*4
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5)(x)  # 144*5
    model = keras.Model(inputs, outputs)
    assert flops_per_image(model) == 2 * (64 * 108 + 36 * 36 + 144 * 5)


def test_saved_fast_model_loads_without_cifarflow(tmp_path):
    """Only built-in Keras classes: pyfunc serving and export load it with plain Keras."""
    import subprocess
    import sys

    model = build_fast(widths=(8, 8, 8))
    initialize_from_data(model, np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3)))
    model.save(tmp_path / "m.keras")
    x = np.full((1, 32, 32, 3), 100.0, np.float32)
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, keras; m = keras.saving.load_model('m.keras'); "
            "print(float(m.predict(np.load('x.npy'), verbose=0).max()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert float(out.stdout.split()[-1]) == pytest.approx(float(model.predict(x, verbose=0).max()), rel=1e-5)
