"""Recipe resolution: overrides, typing, validation errors, logged params."""

from __future__ import annotations

import pytest
import yaml

from cifarflow import config
from cifarflow.errors import CifarflowError
from conftest import REPO


def test_recipes_resolve_with_typed_model_params():
    cfg = config.resolve("cnn")
    assert cfg.model == "cnn" and cfg.model_params["width"] == 1.0 and cfg.model_params["depth"] == 2
    assert (cfg.optimizer, cfg.nesterov, cfg.momentum, cfg.label_smoothing) == ("sgd", True, 0.9, 0.1)
    small = config.resolve("cnn_small")
    assert small.model_params["width"] == 0.5


def test_overrides_reach_training_and_model_settings_with_types():
    overrides = config.parse_overrides(["epochs=3", "width=0.25", "model.dropout=0.1", "flip=false", "limit=null"])
    cfg = config.resolve("cnn", {**overrides, "depth": "1"})
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.model_params["width"] == 0.25 and cfg.model_params["dropout"] == 0.1
    assert cfg.model_params["depth"] == 1 and cfg.flip is False and cfg.limit is None


def test_params_are_flat_and_yaml_roundtrips(tmp_path):
    cfg = config.resolve("cnn_small", {"epochs": 2})
    params = cfg.params()
    assert params["epochs"] == 2 and params["width"] == 0.5 and params["recipe"] == "cnn_small"
    assert "model_params" not in params
    path = tmp_path / "again.yaml"
    path.write_text(cfg.to_yaml())
    again = config.resolve(str(path))
    assert again.params() == params  # a logged recipe.yaml replays the same run


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epoch": 3}, r"unknown parameter 'epoch' .*training settings: .*epochs"),
        ({"widht": 2}, r"unknown parameter 'widht'.*model parameters: width"),
        ({"epochs": "many"}, r"bad value for 'epochs'"),
        ({"learning_rate": -1}, r"bad value for 'learning_rate'"),
        ({"optimizer": "lion"}, r"bad value for 'optimizer'"),
        ({"depth": "deep"}, r"bad value for model parameter 'depth'"),
        ({"reduce_lr_patience": 3}, r"reduce_lr_patience needs schedule=constant"),
        ({"val_fraction": 0, "early_stopping_patience": 2}, r"needs a validation split"),
        ({"cutmix_alpha": 2.0}, r"bad value for 'cutmix_alpha'"),
        ({"crop_padding": 32}, r"bad value for 'crop_padding'"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(CifarflowError, match=message) as e:
        config.resolve("cnn", overrides)
    assert "\n" not in str(e.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(CifarflowError, match=r"no recipe 'wnr'.*use one of: cnn, cnn_small"):
        config.resolve("wnr")


def test_recipe_without_model_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"epochs": 3}))
    with pytest.raises(CifarflowError, match="no 'model:' mapping"):
        config.resolve(str(bad))


def test_unknown_model_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": "resnet9000"}}))
    with pytest.raises(CifarflowError, match="unknown model 'resnet9000'.*use one of: cnn"):
        config.resolve(str(bad))


def test_override_syntax():
    with pytest.raises(CifarflowError, match="write it as key=value"):
        config.parse_overrides(["epochs"])
    assert config.parse_overrides(["a=0.5", "b=true", "c=x=y"]) == {"a": 0.5, "b": True, "c": "x=y"}


def test_epochs_null_keeps_the_recipes_epochs():
    """What the `tune` entry point passes by default: fine for one-phase and two-phase recipes alike."""
    assert config.resolve("cnn_small", {"epochs": None}).epochs == config.resolve("cnn_small").epochs == 30
    two_phase = config.resolve("mobilenetv2", {"epochs": None, "head_epochs": 1, "fine_tune_epochs": 2})
    assert two_phase.epochs == 3
    with pytest.raises(CifarflowError, match="head_epochs \\+ fine_tune_epochs"):
        config.resolve("mobilenetv2", {"epochs": 10, "head_epochs": 1, "fine_tune_epochs": 2})  # all three: must add up
    mlproject = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["tune"]
    assert mlproject["parameters"]["epochs"]["default"] == "null" and "--set epochs={epochs}" in mlproject["command"]


def test_a_recipe_extends_another_and_states_only_what_differs(tmp_path):
    cnn, small = config.resolve("cnn"), config.resolve("cnn_small")
    assert "extends" in yaml.safe_load((config.recipes_dir() / "cnn_small.yaml").read_text())
    differ = {k for k in cnn.params() if cnn.params()[k] != small.params()[k]}
    assert differ == {"recipe", "width", "dropout", "dense_units", "epochs"}
    assert (small.model_params["width"], small.model_params["blocks"], small.learning_rate) == (0.5, 3, 0.1)
    logged = yaml.safe_load(small.to_yaml())  # what a run logs as recipe.yaml: the resolved recipe
    assert "extends" not in logged and logged["learning_rate"] == 0.1 and logged["model"]["depth"] == 2
    assert logged["model"]["width"] == 0.5 and logged["description"].startswith("Custom CNN at half width")

    (tmp_path / "a.yaml").write_text("extends: b.yaml\nepochs: 3\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nmodel: {name: cnn}\n")
    with pytest.raises(CifarflowError, match="extends itself"):
        config.resolve(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("extends: cnn_small\nmodel: {name: resnet20}\nepochs: 2\n")
    child = config.resolve(str(tmp_path / "c.yaml"))  # another model: the parent's model parameters do not apply
    assert child.model == "resnet20" and "width" not in child.model_params and child.recipe == "c"
    assert child.learning_rate == small.learning_rate and child.epochs == 2
    (tmp_path / "d.yaml").write_text("extends: nosuchrecipe\n")
    with pytest.raises(CifarflowError, match="no recipe 'nosuchrecipe'"):
        config.resolve(str(tmp_path / "d.yaml"))


@pytest.mark.parametrize("overrides, head, fine_tune", [
    ({"epochs": 2}, 1, 1),  # mobilenetv2 is 5 + 10: the total keeps the recipe's 1:2 ratio
    ({"epochs": 6}, 2, 4),
    ({"epochs": 15}, 5, 10),
    ({"epochs": 1}, 1, 0),
    ({"epochs": 4, "head_epochs": 3}, 3, 1),  # one phase given: the other gets the rest
    ({"epochs": 4, "fine_tune_epochs": 4}, 0, 4),
])
def test_epochs_of_a_two_phase_recipe_is_the_total(overrides, head, fine_tune):
    cfg = config.resolve("mobilenetv2", overrides)
    assert (cfg.epochs, cfg.head_epochs, cfg.fine_tune_epochs) == (head + fine_tune, head, fine_tune)
    assert config.split_epochs(9, 0, 3) == (0, 9) and config.split_epochs(9, 3, 0) == (9, 0)
