"""End to end on tiny data: one run logs every metric, tag and artifact; reloads; is seeded; resumes."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from cifarflow import config, tracking
from cifarflow.data import datasets
from cifarflow.errors import CifarflowError
from cifarflow.training.trainer import train

TINY = {"width": 0.125, "dense_units": 16, "batch_size": 16, "val_fraction": 0.25, "warmup_epochs": 0}
EPOCH_METRICS = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second"}
FINAL_METRICS = {"test_accuracy", "test_loss", "nll", "macro_f1", "train_seconds", "param_count", "trainable_param_count",
                 "best_val_accuracy"}
ARTIFACTS = {"recipe.yaml", "training_curves.png", "confusion_matrix.png", "classification_report.json",
             "classification_report.csv", "misclassified.png", "classes.json"}
TAGS = {"cifarflow.recipe", "cifarflow.dataset_sha256", "cifarflow.git_commit", "cifarflow.keras_backend",
        "cifarflow.tf_version", "cifarflow.host_cpu", "cifarflow.host_gpu"}


def tiny_config(data_dir, **extra):
    return config.resolve("cnn_small", {**TINY, "data": str(data_dir), "epochs": 1, **extra})


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def interrupt_at(monkeypatch, hook: str, epoch: int, after: bool):
    """Make ``EpochLogger.<hook>`` raise KeyboardInterrupt at ``epoch`` (after its own work when
    ``after``); returns the original hook."""
    original = getattr(tracking.EpochLogger, hook)

    def interrupting(self, e, logs=None):
        if after:
            original(self, e, logs)
        if e == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking.EpochLogger, hook, interrupting)
    return original


def resume_id(error: CifarflowError) -> str:
    """The run id an interrupted run's message names after ``--resume``."""
    return str(error).rsplit("--resume ", 1)[1].rstrip(")")


def test_one_epoch_run_logs_everything_and_the_model_reloads(train_data):
    result = train(tiny_config(train_data), quiet=True, run_name="cnn_small-tiny")
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "cnn_small-tiny"
    assert client.get_experiment(run.info.experiment_id).name == "cifarflow/cnn_small"
    assert EPOCH_METRICS | FINAL_METRICS <= set(run.data.metrics)
    for key in EPOCH_METRICS:
        assert [s for s, _ in history(client, result.run_id, key)] == [0]
    assert run.data.params["epochs"] == "1" and run.data.params["width"] == "0.125"
    assert run.data.params["train_images"] == "54" and run.data.params["val_images"] == "18"
    assert TAGS <= set(run.data.tags)
    ds = datasets.load(train_data)
    assert run.data.tags["cifarflow.dataset_sha256"] == ds.checksum
    assert ARTIFACTS <= {a.path for a in client.list_artifacts(result.run_id)}
    assert run.data.tags["cifarflow.model_uri"] == result.model_uri
    assert result.model_uri.startswith("models:/m-")

    # reloaded by its models:/ URI, through pyfunc and the Keras flavour, it predicts what was evaluated
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    probs = np.asarray(pyfunc.predict(ds.x_test.astype(np.float32)))
    keras_probs = mlflow.keras.load_model(result.model_uri).predict(ds.x_test, verbose=0)
    np.testing.assert_allclose(probs, keras_probs, atol=1e-5)
    assert probs.shape == (18, 3)
    assert (probs.argmax(1) == ds.y_test).mean() == pytest.approx(result.metrics["test_accuracy"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    best_val = max(v for _, v in history(client, result.run_id, "val_accuracy"))
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(best_val)


def test_same_seed_gives_the_same_metrics(train_data):
    cfg = tiny_config(train_data, epochs=2, seed=7)
    a = train(cfg, quiet=True, log_model=False)  # the metrics are the point (model logging: the tests above)
    b = train(cfg, quiet=True, log_model=False)
    client = mlflow.tracking.MlflowClient()
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert history(client, a.run_id, key) == history(client, b.run_id, key)
    assert a.metrics["test_loss"] == b.metrics["test_loss"]

    c = train(tiny_config(train_data, epochs=2, seed=8), quiet=True, log_model=False)  # another seed: another run, not a replay
    assert history(client, c.run_id, "train_loss") != history(client, a.run_id, "train_loss")
    assert c.metrics["test_loss"] != a.metrics["test_loss"]


def test_an_interrupted_run_resumes_from_its_last_epoch(train_data, monkeypatch):
    cfg = tiny_config(train_data, epochs=3)
    original = interrupt_at(monkeypatch, "on_epoch_end", epoch=1, after=True)
    with pytest.raises(CifarflowError, match=r"training interrupted.*--resume (\w+)") as e:
        train(cfg, quiet=True)
    run_id = resume_id(e.value)
    client = mlflow.tracking.MlflowClient()
    assert client.get_run(run_id).info.status == "KILLED"

    monkeypatch.setattr(tracking.EpochLogger, "on_epoch_end", original)
    result = train(cfg, quiet=True, resume=run_id)
    assert result.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    steps = [s for s, _ in history(client, run_id, "epoch_seconds")]
    assert steps.count(0) == 1  # epoch 0 was not trained again
    assert sorted(set(steps)) == [0, 1, 2]


def test_resuming_a_finished_run_or_with_other_settings_is_refused(train_data, monkeypatch):
    finished = train(tiny_config(train_data), quiet=True)
    with pytest.raises(CifarflowError, match=r"run \w+ has no resume state .*finished runs keep none"):
        train(tiny_config(train_data), quiet=True, resume=finished.run_id)

    interrupt_at(monkeypatch, "on_epoch_begin", epoch=1, after=True)
    with pytest.raises(CifarflowError, match=r"--resume (\w+)") as e:
        train(tiny_config(train_data, epochs=2), quiet=True)
    run_id = resume_id(e.value)
    with pytest.raises(CifarflowError, match=r"logged with other settings \(epochs: 2 -> 3"):
        train(tiny_config(train_data, epochs=3), quiet=True, resume=run_id)

    interrupt_at(monkeypatch, "on_epoch_begin", epoch=0, after=False)
    with pytest.raises(CifarflowError, match=r"interrupted before its first epoch ended.*\(start it again\)"):
        train(tiny_config(train_data), quiet=True)


def test_params_typed_on_the_command_line_match_resolved_values():
    assert tracking._same_value("5e-4", 0.0005) and tracking._same_value("2", 2.0)
    assert tracking._same_value("null", None) and tracking._same_value("true", True)
    assert not tracking._same_value("5e-4", 0.001) and not tracking._same_value("abc", 1.0)
    # `mlflow run . -e fast -P widths=[32,128,128]` logs the text shell-quoted; the recipe holds a tuple
    assert tracking._same_value("'[32,128,128]'", (32, 128, 128))
    assert tracking._same_value("[32,128,128]", (32, 128, 128))
    assert tracking._same_value("'../my data/cifar10'", "../my data/cifar10")  # a path with a space
    assert not tracking._same_value("[32,128,128]", (64, 256, 256))


def test_dtype_policy_is_restored_after_the_block_also_when_it_raises():
    import keras

    from cifarflow.training.trainer import dtype_policy

    assert keras.config.dtype_policy().name == "float32"
    with dtype_policy("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(RuntimeError), dtype_policy("mixed_float16"):
        raise RuntimeError("the run failed")
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError), dtype_policy("float8_nonsense"):
        pass
    assert keras.config.dtype_policy().name == "float32"


def test_mixed_precision_and_flip_tta(train_data):
    import keras

    cfg = tiny_config(train_data, precision="mixed_bfloat16", tta="flip", mixup_alpha=0.2)
    result = train(cfg, quiet=True)
    assert keras.config.dtype_policy().name == "float32"  # restored for whoever runs next
    run = mlflow.tracking.MlflowClient().get_run(result.run_id)
    assert run.data.params["precision"] == "mixed_bfloat16" and run.data.params["mixup_alpha"] == "0.2"
    model = mlflow.keras.load_model(result.model_uri)
    ds = datasets.load(train_data)
    x = ds.x_test.astype(np.float32)
    flipped = (model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)) / 2  # image and its mirror
    assert run.data.metrics["test_accuracy_tta"] == pytest.approx((flipped.argmax(1) == ds.y_test).mean())
    assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"
    assert model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0).dtype == np.float32


def test_git_commit_names_the_code_checkout_from_anywhere(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.chdir(tmp_path)  # not a git checkout
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tracking.__file__.rsplit("/", 1)[0],
                          capture_output=True, text=True).stdout.strip()
    assert tracking.git_commit().split("-")[0] == head and len(head) == 40
