"""The CNN builder: contract (raw pixels in, float32 softmax out), shape parameters, registry errors."""

from __future__ import annotations

import numpy as np
import pytest

from cifarflow import models
from cifarflow.errors import CifarflowError


def test_cnn_maps_raw_pixels_to_probabilities():
    model = models.build("cnn", num_classes=7, width=0.25)
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    probs = np.asarray(model(x.astype(np.float32), training=False))
    assert probs.shape == (5, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model.predict(x, verbose=0), probs, atol=1e-5)  # uint8 works too
    assert model.input.shape == (None, 32, 32, 3)


def test_default_cnn_matches_the_baseline_architecture():
    model = models.build("cnn", num_classes=10)
    convs = [l for l in model.layers if l.__class__.__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [64, 64, 128, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) for c in convs)
    kinds = {l.__class__.__name__ for l in model.layers}
    assert {"BatchNormalization", "MaxPooling2D", "Dropout", "GlobalAveragePooling2D", "Normalization"} <= kinds


def test_width_and_depth_scale_the_network():
    base = models.build("cnn", num_classes=10, width=0.5, depth=2)
    deeper = models.build("cnn", num_classes=10, width=0.5, depth=3)
    narrow = models.build("cnn", num_classes=10, width=0.25, depth=2)
    n_convs = lambda m: sum(l.__class__.__name__ == "Conv2D" for l in m.layers)  # noqa: E731
    assert n_convs(deeper) == 9 and n_convs(base) == 6
    assert narrow.count_params() < base.count_params() < deeper.count_params()


def test_normalization_uses_the_given_statistics():
    model = models.build("cnn", num_classes=3, width=0.125, mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 5.0])
    norm = model.get_layer("normalize")
    out = np.asarray(norm(np.array([[[[12.0, 24.0, 40.0]]]], dtype=np.float32)))
    np.testing.assert_allclose(out.ravel(), [1.0, 1.0, 2.0], rtol=1e-5)


def test_unknown_model_and_parameter():
    with pytest.raises(CifarflowError, match="unknown model 'vgg99'"):
        models.build("vgg99", num_classes=10)
    with pytest.raises(CifarflowError, match=r"unknown parameter\(s\) \['filters'\]"):
        models.build("cnn", num_classes=10, filters=3)


def test_builders_take_only_the_data_arguments_they_use():
    """Pixel statistics go to builders with a normalization layer; transfer builders apply their backbone's own."""
    import ast
    import inspect

    for name in models.BUILDERS:
        make = models.builder(name)
        takes = {"mean", "std"} & set(inspect.signature(make).parameters)
        if name in models.transfer.BACKBONES:
            assert not takes, name
        if not takes:
            continue
        body = ast.parse(inspect.getsource(inspect.getmodule(make)))
        fn = next(n for n in ast.walk(body) if isinstance(n, ast.FunctionDef) and n.name == make.__name__)
        used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        assert {"mean", "std"} <= used, name  # taken and used
    model = models.build("mobilenetv2", num_classes=3, resolution=32, weights=None, alpha=0.35,
                         mean=[1.0, 2.0, 3.0], std=[1.0, 1.0, 1.0])  # the trainer passes them to every builder
    assert model.output_shape == (None, 3)
