"""One scoring path: metrics and artifacts of a classifier's test-set probabilities, for training, evaluation and ensembles."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from cifarflow import plots, tracking
from cifarflow.errors import CifarflowError
from cifarflow.evaluation.metrics import (TTA_MODES, classification_metrics, expected_calibration_error, fgsm,
                                         predict_probs, reliability_bins, report_csv)

FGSM_EPS = (2, 8)  # in 1/255 of the pixel range, i.e. pixel units
BATCH_SIZE = 256  # images per forward pass when scoring (training, evaluation and ensembles alike)


def check_tta(tta: str) -> None:
    """Raises CifarflowError unless ``tta`` is one of :data:`metrics.TTA_MODES`."""
    if tta not in TTA_MODES:
        raise CifarflowError(f"unknown tta '{tta}'", f"use --tta {' or --tta '.join(TTA_MODES)}")


@dataclass
class Scored:
    """What :func:`score` computed: the metrics and what the artifacts are drawn from."""

    metrics: dict[str, float]
    probs: np.ndarray  # (N, C) float32 test probabilities
    confusion_matrix: np.ndarray  # (C, C) int, rows true
    report: dict  # scikit-learn's classification_report(output_dict=True)
    bins: list  # reliability bins, see evaluation.reliability_bins


def keras_functions(model, batch_size: int = BATCH_SIZE) -> tuple[Callable, Callable]:
    """``(predict, attack)`` of one Keras model (raw 0..255 pixels in, probabilities out), as :func:`score` takes them."""
    def predict(x, tta):
        return predict_probs(model, x, tta=tta, batch_size=batch_size)

    def attack(x, y, eps):
        return fgsm(model, x, y, eps)

    return predict, attack


def score(ds, predict: Callable[[np.ndarray, str], np.ndarray],
          attack: Callable[[np.ndarray, np.ndarray, float], np.ndarray] | None, *, tta: str = "none",
          fgsm_images: int = 1000, seed: int = 0, probs: np.ndarray | None = None) -> Scored:
    """Score a classifier on ``ds``'s test split: the one scoring path of training, evaluation and ensembles.

    Metrics: ``test_accuracy``; ``test_loss`` and ``nll`` (the same number:
    mean negative log-likelihood of the true class, nats, of the probabilities
    as they are: no label smoothing, no weight penalty); ``ece`` (15 bins);
    ``macro_precision``, ``macro_recall``, ``macro_f1``; ``accuracy_<class>``
    per class; ``test_accuracy_tta`` with ``tta`` ``flip`` or ``multiview``;
    ``robust_accuracy_fgsm_<eps>`` for eps 2 and 8 (pixel units) when
    ``fgsm_images`` > 0 and ``attack`` is given.

    Args:
        ds: a ``cifarflow.data.datasets.Dataset`` (``x_test`` uint8 (N, 32, 32, 3), ``y_test`` int (N,)).
        predict: ``predict(images, tta) -> probabilities (N, C)``.
        attack: ``attack(images, labels, eps) -> adversarial images`` (FGSM, eps in pixel units), or None.
        tta: ``none``, or ``flip`` / ``multiview`` to add ``test_accuracy_tta``.
        fgsm_images: size of the fixed subset (seeded by ``seed``) the FGSM figures use; 0 for none.
        probs: ``predict(ds.x_test, "none")`` when the caller already has it.

    Returns:
        :class:`Scored`.
    """
    probs = predict(ds.x_test, "none") if probs is None else probs
    scores = classification_metrics(ds.y_test, probs, ds.class_names)
    bins = reliability_bins(ds.y_test, probs)
    cm, report = scores["confusion_matrix"], scores["report"]
    metrics = {
        "test_accuracy": scores["accuracy"], "test_loss": scores["nll"], "nll": scores["nll"],
        "ece": expected_calibration_error(ds.y_test, probs),
        "macro_precision": report["macro avg"]["precision"], "macro_recall": report["macro avg"]["recall"],
        "macro_f1": scores["macro_f1"],
    }
    per_class = cm.diagonal() / np.maximum(cm.sum(axis=1), 1)
    metrics.update({f"accuracy_{name}": float(a) for name, a in zip(ds.class_names, per_class)})
    if tta != "none":
        metrics["test_accuracy_tta"] = float((predict(ds.x_test, tta).argmax(1) == ds.y_test).mean())
    if not fgsm_images or attack is None:
        return Scored(metrics, probs, cm, report, bins)
    subset = np.sort(np.random.default_rng(seed).permutation(len(ds.y_test))[:fgsm_images])
    for eps in FGSM_EPS:
        adversarial = attack(ds.x_test[subset], ds.y_test[subset], eps)
        metrics[f"robust_accuracy_fgsm_{eps}"] = float((predict(adversarial, "none").argmax(1) == ds.y_test[subset]).mean())
    return Scored(metrics, probs, cm, report, bins)


def log_scored(scored: Scored, ds) -> None:
    """Log :func:`score`'s metrics and artifacts to the active MLflow run.

    FGSM figures (when scored) are logged as ``robust_accuracy_fgsm`` with step = eps (2
    and 8); artifacts: ``confusion_matrix.png``, ``reliability_diagram.png``,
    ``misclassified.png``, ``classification_report.json``/``.csv``, ``metrics.md``.
    """
    metrics = scored.metrics
    mlflow.log_metrics({k: v for k, v in metrics.items() if not k.startswith("robust_accuracy_fgsm_")})
    for eps in (e for e in FGSM_EPS if f"robust_accuracy_fgsm_{e}" in metrics):
        mlflow.log_metric("robust_accuracy_fgsm", metrics[f"robust_accuracy_fgsm_{eps}"], step=eps)
    with tempfile.TemporaryDirectory() as tmp:
        out, title = Path(tmp), tracking.run_title()
        plots.confusion_matrix(scored.confusion_matrix, ds.class_names, out / "confusion_matrix.png", title=title)
        plots.reliability_diagram(scored.bins, metrics["ece"], out / "reliability_diagram.png", title=title)
        plots.misclassified_grid(ds.x_test, ds.y_test, scored.probs, ds.class_names, out / "misclassified.png",
                                 title=title)
        (out / "classification_report.json").write_text(json.dumps(scored.report, indent=2))
        (out / "classification_report.csv").write_text(report_csv(scored.report))
        (out / "metrics.md").write_text(format_table(metrics))
        mlflow.log_artifacts(tmp)


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as a Markdown table (``metric | value``), one row each."""
    rows = ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    return "\n".join(rows) + "\n"
