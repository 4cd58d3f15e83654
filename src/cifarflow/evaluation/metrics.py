"""Evaluation metrics of predicted probabilities: accuracy, loss, per-class report, confusion matrix."""

from __future__ import annotations

import numpy as np

from cifarflow.errors import CifarflowError
from cifarflow.serving import pixel_problem


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


TTA_MODES = ("none", "flip", "multiview")
TTA_VIEWS = {"none": 1, "flip": 2, "multiview": 6}  # forward passes per image


def multiview(x: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """The six weighted views of airbench94's test-time augmentation (``tta_level=2``,
    legacy/airbench94.py L307-334 in KellerJordan/cifar10-airbench; Jordan 2024,
    arXiv 2404.00498, "Multi-crop evaluation").

    The image and its mirror (weight 1/4 each), and both of them shifted by one
    pixel down-right and by one pixel up-left with reflected borders (weight 1/8
    each): the unshifted pair carries half the weight, the two shifted pairs the
    other half.

    Args:
        x: images (N, H, W, C).

    Returns:
        ``[(weight, views), ...]``: six entries, weights summing to 1, views shaped like ``x``.
    """
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")  # edge not repeated, as PyTorch's
    views = []
    for weight, view in ((0.25, x), (0.125, padded[:, 0:h, 0:w]), (0.125, padded[:, 2:h + 2, 2:w + 2])):
        views += [(weight, view), (weight, view[:, :, ::-1])]
    return views


def predict_probs(model, x: np.ndarray, tta: str = "none", batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities of ``model`` on raw pixels, optionally with test-time augmentation.

    Args:
        model: a Keras model (raw 0..255 pixels in, probabilities out).
        x: images (N, 32, 32, 3), uint8 or float32, 0..255.
        tta: ``"none"``; ``"flip"`` to average the probabilities of each image and
            its horizontal mirror; ``"multiview"`` for the six views of
            :func:`multiview`, combined as airbench94 does, by the weighted mean of
            their logits (here log-probabilities, which differ from the logits by a
            constant per view, so the softmax of the mean is the same).
        batch_size: images per forward pass.

    Returns:
        float32 array (N, num_classes).

    Raises:
        CifarflowError: NaN, infinite or out-of-range pixels (the check of the
            served model, :func:`cifarflow.serving.pixel_problem`).
        ValueError: unknown ``tta``.
    """
    problem = pixel_problem(x)
    if problem:
        raise CifarflowError(problem, "pass images as decoded from their files: RGB values 0..255, no NaN")
    from cifarflow.data.pipeline import predict

    return tta_probs(lambda view: predict(model, view, batch_size), x, tta)


def tta_probs(forward, x: np.ndarray, tta: str = "none") -> np.ndarray:
    """The test-time augmentation of :func:`predict_probs` around any ``forward`` pass.

    Args:
        forward: float32 pixels (N, 32, 32, 3) -> probabilities (N, C), e.g. a
            Keras model's or a pyfunc model's predict.
        x: images (N, 32, 32, 3), 0..255.
        tta: ``"none"``, ``"flip"`` or ``"multiview"`` (see :func:`predict_probs`).

    Returns:
        float32 array (N, C).

    Raises:
        ValueError: unknown ``tta``.
    """
    x = np.asarray(x, dtype=np.float32)
    if tta == "multiview":
        logp = sum(weight * np.log(np.maximum(np.asarray(forward(view)), 1e-30)) for weight, view in multiview(x))
        probs = np.exp(logp - logp.max(axis=1, keepdims=True))
        return np.asarray(probs / probs.sum(axis=1, keepdims=True), dtype=np.float32)
    probs = np.asarray(forward(x))
    if tta == "flip":
        probs = (probs + np.asarray(forward(x[:, :, ::-1, :]))) / 2
    elif tta != "none":
        raise ValueError(f"unknown tta '{tta}' (use {', '.join(TTA_MODES)})")
    return np.asarray(probs, dtype=np.float32)


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> list[tuple[float, float, int]]:
    """Per confidence bin: ``(mean confidence, accuracy, count)``.

    The confidence of a prediction is its top probability; bins are equal
    widths over (0, 1], right-inclusive (Guo et al. 2017, "On Calibration of
    Modern Neural Networks"). Empty bins give ``(nan, nan, 0)``.
    """
    y_true = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        out.append((float(confidence[mask].mean()) if n else float("nan"),
                    float(correct[mask].mean()) if n else float("nan"), n))
    return out


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over confidence bins of (bin share of the N images) x |accuracy - mean confidence|.

    Args:
        y_true: int labels (N,).
        probs: probabilities (N, C).
        bins: equal-width confidence bins (15 as in Guo et al. 2017).

    Returns:
        ECE as a fraction in [0, 1].
    """
    n = len(np.asarray(y_true).reshape(-1))
    return float(sum(count / n * abs(acc - conf) for conf, acc, count in reliability_bins(y_true, probs, bins) if count))


def fgsm(model, x: np.ndarray, y_true: np.ndarray, eps: float, batch_size: int = 128) -> np.ndarray:
    """Fast gradient sign method (Goodfellow et al. 2015) on raw pixels.

    ``x + eps * sign(d loss / d x)``, clipped to 0..255, with the
    cross-entropy of the true labels as the loss.

    Args:
        model: Keras model, raw 0..255 pixels in, probabilities out; or any
            callable ``model(images, training=False)`` built from Keras ops
            (e.g. a soft-voting ensemble).
        x: images (N, 32, 32, 3), 0..255.
        y_true: int labels (N,).
        eps: step in pixel units (``eps = 8`` is the usual 8/255).
        batch_size: images per gradient computation.

    Returns:
        float32 adversarial images (N, 32, 32, 3).

    Raises:
        NotImplementedError: a Keras backend other than TensorFlow or JAX.
    """
    import keras

    backend = keras.backend.backend()
    out = []
    for i in range(0, len(x), batch_size):
        xb = np.asarray(x[i:i + batch_size], dtype=np.float32)
        yb = np.asarray(y_true[i:i + batch_size])

        def loss(images):
            probs = model(images, training=False)
            return keras.ops.sum(keras.losses.categorical_crossentropy(keras.ops.one_hot(yb, probs.shape[-1]), probs))

        if backend == "tensorflow":
            import tensorflow as tf

            xt = tf.convert_to_tensor(xb)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                value = loss(xt)
            grad = tape.gradient(value, xt).numpy()
        elif backend == "jax":
            import jax

            grad = np.asarray(jax.grad(loss)(xb))
        else:
            raise NotImplementedError(f"FGSM needs input gradients; backend {backend} is not supported")
        out.append(np.clip(xb + eps * np.sign(grad), 0, 255))
    return np.concatenate(out).astype(np.float32)


def report_csv(report: dict) -> str:
    """scikit-learn's ``output_dict`` report as CSV (class, precision, recall, f1-score, support)."""
    lines = ["class,precision,recall,f1-score,support"]
    for name, row in report.items():
        if isinstance(row, dict):
            lines.append(f"{name},{row['precision']:.4f},{row['recall']:.4f},{row['f1-score']:.4f},{int(row['support'])}")
    return "\n".join(lines) + "\n"
