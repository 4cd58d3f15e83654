"""Transfer learning: backbone preprocessing by construction, two-phase training, weights sources, class subsets.

All with weights=none at small resolutions on tiny data; ImageNet downloads are simulated as failing.
"""

from __future__ import annotations


import keras
import mlflow
import numpy as np
import pytest

from cifarflow import config, models
from cifarflow.data import datasets
from cifarflow.cli import main
from cifarflow.errors import CifarflowError
from cifarflow.models import transfer
from cifarflow.training.trainer import train
from conftest import predict_in_fresh_process

BACKBONES = ("mobilenetv2", "efficientnetv2b0", "efficientnetb0", "resnet50v2")
SMALL = {"weights": "none", "resolution": 32}
# each application's own preprocess_input, applied to resized 0..255 pixels
PREPROCESS = {
    "mobilenetv2": keras.applications.mobilenet_v2.preprocess_input,
    "resnet50v2": keras.applications.resnet_v2.preprocess_input,
    "efficientnetb0": keras.applications.efficientnet.preprocess_input,
    "efficientnetv2b0": keras.applications.efficientnet_v2.preprocess_input,
}


def pixels(n=4, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)).astype(np.float32)
    x[0] = 0.0
    x[1] = 255.0  # the extremes of the range
    return x


def backbone_input(model, x):
    """What the nested backbone receives for raw pixels ``x``."""
    base = transfer.backbone_of(model)
    feeder = model.layers[model.layers.index(base) - 1]
    return np.asarray(keras.Model(model.input, feeder.output)(x))


@pytest.mark.parametrize("name", BACKBONES)
def test_each_backbone_receives_the_value_range_it_expects(name):
    model = models.build(name, num_classes=3, weights="none", resolution=64)
    x = pixels()
    fed = backbone_input(model, x)
    resized = np.asarray(keras.layers.Resizing(64, 64, interpolation="bilinear")(x))
    assert fed.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(fed, np.asarray(PREPROCESS[name](resized.copy())), atol=1e-4)
    base = transfer.backbone_of(model)
    if name in ("mobilenetv2", "resnet50v2"):  # preprocess_input mode "tf": [-1, 1]
        assert fed.min() == pytest.approx(-1.0) and fed.max() == pytest.approx(1.0)
    else:  # the EfficientNets take 0..255 and rescale to [0, 1] as their own first layer
        assert fed.min() == pytest.approx(0.0) and fed.max() == pytest.approx(255.0)
        rescale = base.layers[1]
        assert type(rescale).__name__ == "Rescaling" and rescale.scale == pytest.approx(1 / 255)
        assert type(base.layers[2]).__name__ == "Normalization"
    probs = model.predict(x, verbose=0)
    assert probs.shape == (4, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_fine_tune_fraction_unfreezes_the_top_layers_but_no_batchnorm(name):
    model = models.build(name, num_classes=3, **SMALL)
    body = [l for l in transfer.backbone_of(model).layers if not isinstance(l, keras.layers.InputLayer)]
    transfer.freeze_backbone(model)
    assert not any(l.trainable for l in body) and model.get_layer("probs").trainable
    frozen, unfrozen = transfer.unfreeze_top(model, 0.25)
    top = body[-round(0.25 * len(body)):]
    bn_in_top = sum(isinstance(l, keras.layers.BatchNormalization) for l in top)
    assert unfrozen == len(top) - bn_in_top and frozen == len(body) - unfrozen
    assert [l.trainable for l in body] == [l in top and not isinstance(l, keras.layers.BatchNormalization)
                                           for l in body]
    bn_in_top5 = sum(isinstance(l, keras.layers.BatchNormalization) for l in body[-5:])
    assert transfer.unfreeze_top(model, 0.25, count=5) == (len(body) - 5 + bn_in_top5, 5 - bn_in_top5)
    assert [l.trainable for l in body[-5:]] == [not isinstance(l, keras.layers.BatchNormalization) for l in body[-5:]]
    assert transfer.unfreeze_top(model, 0.0) == (len(body), 0)  # fraction 0: phase 2 trains the head only


@pytest.mark.parametrize("name", BACKBONES)
def test_fine_tune_batchnorm_trains_the_batchnorm_layers_of_the_top_only(name):
    model = models.build(name, num_classes=3, **SMALL)
    body = [l for l in transfer.backbone_of(model).layers if not isinstance(l, keras.layers.InputLayer)]
    top = body[-round(0.5 * len(body)):]
    assert any(isinstance(l, keras.layers.BatchNormalization) for l in top)
    assert transfer.unfreeze_top(model, 0.5, batchnorm=True) == (len(body) - len(top), len(top))
    assert [l.trainable for l in body] == [l in top for l in body]  # BatchNorm below the top stays frozen
    assert any(isinstance(l, keras.layers.BatchNormalization) for l in body[:-len(top)])


def test_the_fine_tune_phase_uses_fine_tune_optimizer_sgd_by_default(train_data):
    from cifarflow.training.transfer import TransferPlan

    for extra, expected in (({}, "sgd"), ({"fine_tune_optimizer": "adam"}, "adam")):
        head, tune = TransferPlan(two_phase(train_data, "mobilenetv2", optimizer="adamw",
                                            fine_tune_learning_rate=0.0003, **extra)).phases
        assert head.config.optimizer == "adamw"
        assert (tune.config.optimizer, tune.config.learning_rate, tune.config.schedule) == (expected, 0.0003, "cosine")


def test_the_recipe_option_fine_tune_batchnorm_reaches_the_fine_tune_phase(train_data):
    from cifarflow.training.transfer import TransferPlan

    model = models.build("efficientnet_lite0", num_classes=3, **SMALL)
    bns = [l for l in transfer.backbone_of(model).layers if isinstance(l, keras.layers.BatchNormalization)]
    for on in (False, True):
        (head, tune) = TransferPlan(two_phase(train_data, "efficientnet_lite0", fine_tune_fraction=1.0,
                                              fine_tune_batchnorm=on)).phases
        head.prepare(model)
        assert not any(l.trainable for l in bns)
        tune.prepare(model)
        assert [l.trainable for l in bns] == [on] * len(bns)


def bn_stats(model):
    base = transfer.backbone_of(model)
    return [(np.asarray(l.moving_mean), np.asarray(l.moving_variance))
            for l in base.layers if isinstance(l, keras.layers.BatchNormalization)]


def two_phase(data_dir, name, **extra):
    return config.resolve(name, {**SMALL, "data": str(data_dir), "head_epochs": 1, "fine_tune_epochs": 1,
                                 "fine_tune_fraction": 0.5, "batch_size": 32, "val_fraction": 0.25,
                                 "crop_padding": 0, **extra})


class KeepModel(keras.callbacks.Callback):
    """Remembers the model ``fit`` trained: the trainer's model object, scored after the best weights are restored."""

    kept = None

    def on_train_end(self, logs=None):
        self.kept = self.model


def assert_two_phase_run(name, run_id):
    """The run's tags and per-epoch metrics of a head + fine-tune run of 1 + 1 epochs, fine_tune_fraction 0.5."""
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["cifarflow.phase"] == "fine_tune" and tags["cifarflow.phase_epochs"] == "head:0-0,fine_tune:1-1"
    assert tags["cifarflow.weights_source"] == "none"
    steps = lambda key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),  # noqa: E731
                                                           key=lambda m: m.step)]
    assert [s for s, _ in steps("val_accuracy")] == [0, 1]  # one curve across both phases
    assert steps("phase") == [(0, 1.0), (1, 2.0)]
    (_, head_params), (_, tuned_params) = steps("trainable_param_count")
    assert head_params < tuned_params
    fresh = models.build(name, num_classes=3, **SMALL)
    expected = transfer.unfreeze_top(fresh, 0.5)
    assert (steps("frozen_layers")[1][1], steps("unfrozen_layers")[1][1]) == expected
    assert steps("unfrozen_layers")[0][1] == 0
    return run


def assert_batchnorm_never_moved(model):
    """BatchNorm ran in inference mode in both phases: its moving statistics never moved from their init."""
    for mean, var in bn_stats(model):
        np.testing.assert_array_equal(mean, 0.0)
        np.testing.assert_array_equal(var, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", [b for b in BACKBONES if b != "mobilenetv2"])  # mobilenetv2: the CLI test below
def test_each_backbone_trains_both_phases_with_batchnorm_frozen_and_reloads(name, tmp_path):
    """Per backbone, the recipe's two phases (TransferPlan's head then fine_tune ``prepare``) on the model as
    built: the head phase trains the head only, the fine-tune phase also the unfrozen top of the backbone,
    BatchNorm runs in inference mode in both (its moving statistics never move), and the trained model saves and
    reloads as .keras with its predictions. The trainer's wiring of the phases into one MLflow run is the same
    for every backbone: trained in full, through the CLI, for mobilenetv2 below."""
    from cifarflow.training.transfer import TransferPlan

    model = models.build(name, num_classes=3, **SMALL)
    x, y = pixels(8, seed=1), np.arange(8) % 3
    base = transfer.backbone_of(model)
    head, tune = TransferPlan(two_phase(tmp_path, name)).phases
    for phase in (head, tune):
        counts = phase.prepare(model)
        backbone_before = [np.asarray(w).copy() for w in base.weights]
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        moved = [not np.array_equal(a, np.asarray(w)) for a, w in zip(backbone_before, base.weights)]
        if phase is head:
            assert not any(moved)  # the frozen backbone
        else:
            assert counts == dict(zip(("frozen_layers", "unfrozen_layers"), transfer.unfreeze_top(model, 0.5)))
            assert any(moved)  # its unfrozen top trained
    assert_batchnorm_never_moved(model)
    probs = model.predict(x, verbose=0)
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)  # as the pyfunc loads it
    assert_batchnorm_never_moved(reloaded)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), probs, atol=1e-5)


@pytest.mark.slow
def test_epochs_on_the_command_line_is_the_total_of_both_phases_and_the_logged_model_reloads(train_data, tmp_path,
                                                                                             capsys):
    """mobilenetv2 two-phase from the CLI (--epochs 2 = 1 + 1): the run as above, and the logged model reloads
    with the predictions that were evaluated (Keras and pyfunc flavours, and in a fresh process)."""
    main(["train", "mobilenetv2", "--data", str(train_data), "--epochs", "2", "--quiet", "--set", "alpha=0.35",
          "--set", "weights=none", "--set", "resolution=32", "--set", "fine_tune_fraction=0.5", "--set", "batch_size=64",
          "--set", "val_fraction=0.25", "--set", "crop_padding=0", "--set", "early_stopping_patience=null"])
    run = mlflow.search_runs(experiment_names=["cifarflow/mobilenetv2"], output_format="list")[0]
    assert (run.data.params["epochs"], run.data.params["head_epochs"], run.data.params["fine_tune_epochs"]) == ("2", "1", "1")
    assert_two_phase_run("mobilenetv2", run.info.run_id)
    model_uri = run.data.tags["cifarflow.model_uri"]
    model = mlflow.keras.load_model(model_uri)
    assert_batchnorm_never_moved(model)

    # the logged model reloads with the predictions that were evaluated (pyfunc and Keras flavours alike)
    ds = datasets.load(train_data)
    probs = model.predict(ds.x_test, verbose=0)
    assert (probs.argmax(1) == ds.y_test).mean() == pytest.approx(run.data.metrics["test_accuracy"])
    pyfunc = np.asarray(mlflow.pyfunc.load_model(model_uri).predict(ds.x_test.astype(np.float32)))
    np.testing.assert_allclose(pyfunc, probs, atol=1e-5)
    # ... also in a fresh process that never imports cifarflow (built-in layers only)
    fresh = predict_in_fresh_process("keras", model_uri, ds.x_test.astype(np.float32), tmp_path)
    np.testing.assert_allclose(fresh, probs, atol=1e-5)


@pytest.mark.slow
def test_source_task_weights_transfer_to_a_target_run(train_data):
    mobile = {"alpha": 0.35, "batch_size": 64, "val_fraction": 0.25, "crop_padding": 0, "limit": 40}
    keep = KeepModel()  # the trained source model (model logging: the tests above)
    source = train(config.resolve("mobilenetv2", {**SMALL, **mobile, "data": str(train_data), "epochs": 1,
                                                  "source_task": True, "classes": ["cat", "dog"]}), quiet=True,
                   extra_callbacks=[keep], log_model=False)
    client = mlflow.tracking.MlflowClient()
    src = client.get_run(source.run_id)
    assert src.data.tags["cifarflow.phase"] == "source" and src.data.params["num_classes"] == "2"
    uri = src.data.tags["cifarflow.backbone_weights"]
    assert uri == f"runs:/{source.run_id}/backbone.weights.h5"
    assert "backbone.weights.h5" in {a.path for a in client.list_artifacts(source.run_id)}
    # BatchNorm trained in the source task: its statistics moved
    assert any(not np.allclose(m, 0) for m, _ in bn_stats(keep.kept))

    # a target model given the file starts from exactly the source's backbone, and says so in its tags
    built = models.build("mobilenetv2", num_classes=2, resolution=32, alpha=0.35, weights=uri)
    tags = transfer.weights_tags(uri, built)
    assert tags["cifarflow.weights_source"] == uri
    assert tags["cifarflow.weights_sha256"] == src.data.tags["cifarflow.backbone_weights_sha256"]
    learned = transfer.backbone_of(keep.kept)
    assert len(transfer.backbone_of(built).weights) == len(learned.weights)
    for a, b in zip(transfer.backbone_of(built).weights, learned.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batchnorm_calibration_estimates_statistics_and_keeps_flags():
    model = models.build("mobilenetv2", num_classes=3, alpha=0.35, resolution=64, weights="none")
    transfer.freeze_backbone(model)
    x = pixels(8)
    used = transfer.calibrate_batchnorm(model, [(x[:4], None), (x[4:], None)])
    assert used == 2
    stats = bn_stats(model)
    assert not np.allclose(stats[0][0], 0) and not np.allclose(stats[0][1], 1)
    base = transfer.backbone_of(model)
    assert not any(l.trainable for l in base.layers)  # flags and momentum restored
    assert {l.momentum for l in base.layers if isinstance(l, keras.layers.BatchNormalization)} == {0.999}
    model(x, training=True)  # frozen BatchNorm: inference mode even in a training call
    for (m0, v0), (m1, v1) in zip(stats, bn_stats(model)):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v0, v1)


@pytest.mark.parametrize("name", BACKBONES)
def test_offline_imagenet_is_a_one_line_error(name, monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- "
                        "[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(CifarflowError) as e:
        models.build(name, num_classes=3, weights="imagenet", resolution=96)
    message = str(e.value)
    assert "\n" not in message and f"cannot load ImageNet weights for {name}" in message
    assert str(transfer.keras_models_dir()) in message and "weights=PATH" in message


def test_offline_imagenet_from_the_command_line(train_data, monkeypatch, capsys):
    monkeypatch.setattr("keras.src.utils.file_utils.get_file",
                        lambda *a, **k: (_ for _ in ()).throw(Exception("URL fetch failure on https://x: None")))
    with pytest.raises(SystemExit) as e:
        main(["train", "mobilenetv2", "--data", str(train_data), "--set", "resolution=96", "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: cannot load ImageNet weights for mobilenetv2") and "weights=PATH" in err


def test_bad_weights_files(tmp_path):
    with pytest.raises(CifarflowError, match="weights file not found"):
        models.build("mobilenetv2", num_classes=3, resolution=32, weights=str(tmp_path / "nope.h5"))
    other = tmp_path / "resnet.weights.h5"
    transfer.backbone_of(models.build("resnet50v2", num_classes=3, **SMALL)).save_weights(str(other))
    with pytest.raises(CifarflowError, match="does not fit mobilenetv2"):
        models.build("mobilenetv2", num_classes=3, resolution=32, weights=str(other))


def test_class_subsets_are_relabelled_in_dataset_order(folder_data):
    ds = datasets.load(folder_data)
    sub = datasets.select_classes(ds, ["ship", "cat"])
    assert sub.class_names == ("cat", "ship")
    assert set(sub.y_train) == {0, 1} and len(sub.y_train) == 24 and len(sub.y_test) == 8
    np.testing.assert_array_equal(sub.x_train[sub.y_train == 1], ds.x_train[ds.y_train == 2])
    with pytest.raises(CifarflowError, match=r"\['horse'\] not in the dataset"):
        datasets.select_classes(ds, ["cat", "horse"])
    animals, vehicles = set(datasets.CLASS_GROUPS["animals"]), set(datasets.CLASS_GROUPS["vehicles"])
    assert animals == {"bird", "cat", "deer", "dog", "frog", "horse"}
    assert vehicles == {"airplane", "automobile", "ship", "truck"}


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": 4, "head_epochs": 5, "fine_tune_epochs": 10}, r"epochs=4 is not head_epochs \+ fine_tune_epochs = 5 \+ 10"),
    ({"fine_tune_fraction": -0.1}, r"bad value for 'fine_tune_fraction'"),
    ({"classes": "plants"}, r"bad value for 'classes"),
    ({"alpha": "wide"}, r"bad value for model parameter 'alpha'"),
    ({"resolution": 16}, r"bad value for model parameter 'resolution'.*greater than or equal to 32"),
    ({"dropout": 1.0}, r"bad value for model parameter 'dropout'"),
])
def test_bad_transfer_settings(overrides, message):
    with pytest.raises(CifarflowError, match=message):
        config.resolve("mobilenetv2", overrides)


def test_phase_settings_need_a_transfer_model_and_epochs_follow_the_phases():
    with pytest.raises(CifarflowError, match="need a transfer model"):
        config.resolve("cnn", {"head_epochs": 1, "fine_tune_epochs": 1, "epochs": 2})
    with pytest.raises(CifarflowError, match="set both head_epochs and fine_tune_epochs"):
        config.resolve("cnn", {"head_epochs": 1})
    cfg = config.resolve("resnet50v2", {"head_epochs": 2.0, "fine_tune_epochs": 3, "epochs": 5})
    assert cfg.epochs == 5 and cfg.two_phase
    assert config.resolve("resnet50v2", {"source_task": True, "epochs": 7}).two_phase is False
