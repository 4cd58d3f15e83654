"""Evaluation metrics of predicted probabilities: accuracy, loss, per-class report, confusion matrix."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names) -> dict:
    """Metrics of softmax outputs against integer labels.

    Args:
        y_true: int labels (N,).
        probs: float probabilities (N, num_classes), rows summing to 1.
        class_names: names of the classes, index i names label i.

    Returns:
        dict with ``accuracy`` (fraction), ``nll`` (mean negative
        log-likelihood, nats), ``macro_f1``, ``confusion_matrix`` (int array
        (C, C), rows true, columns predicted) and ``report`` (scikit-learn's
        per-class precision/recall/f1/support dict).

    Raises:
        ValueError: shapes that do not match.
    """
    from sklearn.metrics import classification_report, confusion_matrix, f1_score, log_loss

    y_true = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 +- 1e-7
    if probs.ndim != 2 or len(probs) != len(y_true) or probs.shape[1] != len(class_names):
        raise ValueError(f"probs {probs.shape} do not match {len(y_true)} labels of {len(class_names)} classes")
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(axis=1)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "nll": float(log_loss(y_true, np.clip(probs, 1e-12, 1.0), labels=labels)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels),
        "report": classification_report(
            y_true, y_pred, labels=labels, target_names=list(class_names), output_dict=True, zero_division=0
        ),
    }


def predict(model, x: np.ndarray, tta: str = "none", batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities of ``model`` on raw pixels, optionally with test-time augmentation.

    Args:
        model: a Keras model (raw 0..255 pixels in, probabilities out).
        x: images (N, 32, 32, 3), uint8 or float32, 0..255.
        tta: ``"none"``, or ``"flip"`` to average the probabilities of each
            image and its horizontal mirror.
        batch_size: images per forward pass.

    Returns:
        float32 array (N, num_classes).

    Raises:
        ValueError: unknown ``tta``.
    """
    x = np.asarray(x, dtype=np.float32)
    probs = model.predict(x, batch_size=batch_size, verbose=0)
    if tta == "flip":
        probs = (probs + model.predict(x[:, :, ::-1, :], batch_size=batch_size, verbose=0)) / 2
    elif tta != "none":
        raise ValueError(f"unknown tta '{tta}' (use none or flip)")
    return np.asarray(probs, dtype=np.float32)


def report_csv(report: dict) -> str:
    """scikit-learn's ``output_dict`` report as CSV (class, precision, recall, f1-score, support)."""
    lines = ["class,precision,recall,f1-score,support"]
    for name, row in report.items():
        if isinstance(row, dict):
            lines.append(f"{name},{row['precision']:.4f},{row['recall']:.4f},{row['f1-score']:.4f},{int(row['support'])}")
    return "\n".join(lines) + "\n"
