"""From-scratch builders: parameter counts against the papers, the model contract, bad shapes."""

from __future__ import annotations

import numpy as np
import pytest

from cifarflow import models


def trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.mark.parametrize(
    "name, params, expected, tolerance",
    [
        ("resnet20", {"depth": 20}, 0.27e6, 0.01),            # He et al. 2016, Table 6
        ("wrn", {"depth": 28, "width": 10}, 36.5e6, 0.01),    # Zagoruyko & Komodakis 2016, Table 4
        # the paper prints 2.7M, rounded to 0.1M: +-0.05M is 1.85%
        ("wrn", {"depth": 16, "width": 4}, 2.7e6, 0.0185),
        ("simple5", {}, 0.3e6, 0.10),                          # "about 0.3M" (no paper figure)
        ("vgg10", {}, 0.4e6, 0.10),                            # "about 0.4M" (no paper figure)
    ],
)
def test_parameter_counts(name, params, expected, tolerance):
    model = models.build(name, num_classes=10, **params)
    assert abs(trainable(model) - expected) / expected <= tolerance, trainable(model)


def test_resnet20_structure():
    model = models.build("resnet20", num_classes=10)
    convs = [l for l in model.layers if type(l).__name__ == "Conv2D"]
    assert len(convs) == 19  # 19 conv + 1 dense = 20 weighted layers
    assert sorted({c.filters for c in convs}) == [16, 32, 64]


def test_wrn_has_dropout_between_convs_and_widens():
    model = models.build("wrn", num_classes=10, depth=16, width=2, dropout=0.3)
    dropout = model.get_layer("group1_block1_dropout")
    assert dropout.input is model.get_layer("group1_block1_relu2").output
    assert model.get_layer("group1_block1_conv2").input is dropout.output
    assert {l.filters for l in model.layers if type(l).__name__ == "Conv2D"} == {16, 32, 64, 128}


@pytest.mark.parametrize("name, params", [
    ("simple5", {}), ("vgg10", {}), ("resnet20", {}), ("wrn", {"depth": 10, "width": 1}),
    ("vit", {"embed_dim": 32, "depth": 2, "heads": 2}),
])
def test_every_builder_keeps_the_model_contract(name, params):
    model = models.build(name, num_classes=4, **params)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    probs = model.predict(x, verbose=0)
    assert probs.shape == (3, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_vit_tokens_and_heads():
    model = models.build("vit", num_classes=10, patch_size=4, embed_dim=64, depth=3, heads=4)
    assert model.get_layer("tokens").output.shape == (None, 64, 64)
    assert sum(type(l).__name__ == "MultiHeadAttention" for l in model.layers) == 3
    assert model.get_layer("position_embed").weights[0].shape == (64, 64)


def test_vit_reloads_from_a_saved_file(tmp_path):
    """Built-in layers only: a saved ViT loads without cifarflow's help."""
    import keras

    model = models.build("vit", num_classes=3, embed_dim=32, depth=1, heads=2)
    model.save(tmp_path / "vit.keras")
    again = keras.saving.load_model(tmp_path / "vit.keras")
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("name, params, message", [
    ("resnet20", {"depth": 21}, "6n\\+2"),
    ("wrn", {"depth": 27}, "6n\\+4"),
    ("vit", {"patch_size": 5}, "patch_size must divide 32"),
])
def test_bad_shapes_are_refused(name, params, message):
    from cifarflow.errors import CifarflowError

    with pytest.raises(CifarflowError, match=f"cannot build '{name}': .*{message}") as e:
        models.build(name, num_classes=10, **params)
    assert "\n" not in str(e.value)


def test_wrn_batchnorm_follows_the_reference_momentum():
    model = models.build("wrn", num_classes=10, depth=10, width=1)
    bns = [l for l in model.layers if type(l).__name__ == "BatchNormalization"]
    assert bns and all(l.momentum == 0.9 for l in bns)
