"""Evaluation: ECE and reliability bins by hand, FGSM, and `cifarflow evaluate` logging a linked run."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest

from cifarflow import config
from cifarflow.evaluation import metrics
from cifarflow.cli import main
from cifarflow.training.trainer import train


def test_ece_on_a_hand_computed_case():
    probs = np.array([[0.9, 0.1], [0.62, 0.38], [0.81, 0.19], [0.28, 0.72]])
    y = np.array([0, 1, 0, 1])  # right, wrong, right, right; each in its own bin of 15
    # (|1-0.9| + |0-0.62| + |1-0.81| + |1-0.72|) / 4
    assert metrics.expected_calibration_error(y, probs) == pytest.approx(1.19 / 4)
    bins = metrics.reliability_bins(y, probs)
    assert [c for _, _, c in bins].count(1) == 4 and sum(c for _, _, c in bins) == 4
    assert bins[9] == (pytest.approx(0.62), 0.0, 1)  # 0.62 lies in (9/15, 10/15]


def test_classification_metrics_on_a_hand_computed_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1],   # 0 -> 0
                      [0.3, 0.6, 0.1],   # 0 -> 1
                      [0.2, 0.7, 0.1],   # 1 -> 1
                      [0.1, 0.5, 0.4],   # 1 -> 1
                      [0.5, 0.0, 0.5],   # 2 -> 0 (tie: the lower index, as argmax)
                      [0.1, 0.1, 0.8]])  # 2 -> 2
    m = metrics.classification_metrics(y, probs, ["a", "b", "c"])
    np.testing.assert_array_equal(m["confusion_matrix"], [[1, 1, 0], [0, 2, 0], [1, 0, 1]])  # rows true
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["nll"] == pytest.approx(-np.log([0.8, 0.3, 0.7, 0.5, 0.5, 0.8]).mean())
    # precision a 1/2, b 2/3, c 1/1; recall a 1/2, b 2/2, c 1/2
    f1 = [2 * p * r / (p + r) for p, r in ((1 / 2, 1 / 2), (2 / 3, 1.0), (1.0, 1 / 2))]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["report"]["b"]["precision"] == pytest.approx(2 / 3) and m["report"]["c"]["recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="do not match"):
        metrics.classification_metrics(y, probs[:, :2], ["a", "b", "c"])


def test_ece_is_zero_when_confidence_matches_accuracy():
    probs = np.array([[0.75, 0.25]] * 4)
    y = np.array([0, 0, 0, 1])  # 75% right at confidence 0.75
    assert metrics.expected_calibration_error(y, probs) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(np.array([0, 1]), np.eye(2)) == 0.0


def test_fgsm_raises_the_loss_and_flips_predictions_of_a_linear_model():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(seed=1))(
        keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
    labels = model.predict(images, verbose=0).argmax(1)  # the model is right on all of them
    adversarial = metrics.fgsm(model, images, labels, eps=8)
    assert adversarial.shape == images.shape and adversarial.min() >= 0 and adversarial.max() <= 255
    assert np.abs(adversarial - images).max() <= 8 + 1e-4
    after = model.predict(adversarial, verbose=0)
    loss = lambda p: -np.log(p[np.arange(16), labels]).mean()  # noqa: E731
    assert loss(after) > loss(model.predict(images, verbose=0))
    assert (after.argmax(1) != labels).any()


def test_evaluate_command_logs_a_linked_run(train_data, capsys):
    cfg = config.resolve("cnn_small", {"data": str(train_data), "epochs": 1, "width": 0.125, "dense_units": 16,
                                       "batch_size": 16, "val_fraction": 0.25, "warmup_epochs": 0})
    trained = train(cfg, quiet=True)
    main(["evaluate", trained.model_uri, "--tta", "flip", "--fgsm-images", "9"])
    out = capsys.readouterr().out
    assert "| ece |" in out and "| robust_accuracy_fgsm_8 |" in out and "evaluation run " in out
    run = mlflow.search_runs(experiment_names=["cifarflow/evaluation"], output_format="list")[0]
    assert run.data.tags["cifarflow.source_run_id"] == trained.run_id
    assert run.data.tags["cifarflow.model_uri"] == trained.model_uri
    m = run.data.metrics
    assert m["test_accuracy"] == pytest.approx(trained.metrics["test_accuracy"])
    # one scoring path: test_loss is the test NLL in the training run and in the evaluation run alike
    logged = mlflow.tracking.MlflowClient().get_run(trained.run_id).data.metrics
    assert cfg.label_smoothing > 0  # the training objective (label-smoothed) is not what test_loss reports
    assert abs(m["test_loss"] - logged["test_loss"]) < 1e-6 and abs(m["test_loss"] - trained.metrics["test_loss"]) < 1e-6
    assert logged["test_loss"] == logged["nll"] and m["test_loss"] == m["nll"]
    assert "robust_accuracy_fgsm" not in logged  # training scores without FGSM, evaluation adds it
    assert {"ece", "nll", "macro_precision", "macro_recall", "macro_f1", "test_accuracy_tta",
            "accuracy_cat", "accuracy_dog", "accuracy_ship"} <= set(m)
    steps = sorted(x.step for x in mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id,
                                                                                    "robust_accuracy_fgsm"))
    assert steps == [2, 8]
    names = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "reliability_diagram.png", "misclassified.png", "metrics.md",
            "classification_report.json"} <= names
    main(["evaluate", f"runs:/{trained.run_id}", "--fgsm-images", "3"])  # the run's model, by run URI
    assert "evaluation run " in capsys.readouterr().out


def test_evaluate_unknown_model_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "models:/m-00000000000000000000000000000000"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no logged model") and err.count("\n") == 1
