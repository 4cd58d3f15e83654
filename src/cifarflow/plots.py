"""Figures saved as PNG: training curves, confusion matrix, image grids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Loss and accuracy per epoch (train and validation) side by side, saved to ``path``."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split in ("train", "val"):
            values = history.get(f"{split}_{metric}")
            if values:
                ax.plot(range(len(values)), values, marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix(cm: np.ndarray, class_names, path: Path) -> Path:
    """Confusion matrix (rows true, columns predicted) with counts, saved to ``path`` (scikit-learn's
    ``ConfusionMatrixDisplay``)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", values_format="d", xticks_rotation=45, text_kw={"fontsize": 7})
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def image_grid(images: np.ndarray, titles: list[str], path: Path, columns: int = 8) -> Path:
    """uint8 images (N, H, W, 3) in a grid, each with a title, saved to ``path``."""
    n = max(1, len(images))
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img)
        ax.set_title(title, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def misclassified_grid(x, y_true, probs, class_names, path: Path, count: int = 32) -> Path:
    """The ``count`` most confident mistakes, titled ``true -> predicted (p)``."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    wrong = wrong[np.argsort(-probs[wrong, y_pred[wrong]])][:count]
    titles = [f"{class_names[y_true[i]]} -> {class_names[y_pred[i]]} ({probs[i, y_pred[i]]:.2f})" for i in wrong]
    return image_grid(x[wrong], titles, path)


def samples_per_class(x, y, class_names, path: Path, per_class: int = 8, seed: int = 0) -> Path:
    """``per_class`` random images of each class, one row per class."""
    rng = np.random.default_rng(seed)
    picks, titles = [], []
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(y == c)
        chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for i in chosen:
            picks.append(x[i])
            titles.append(name)
        for _ in range(per_class - len(chosen)):  # keep one row per class
            picks.append(np.zeros_like(x[0]))
            titles.append("")
    return image_grid(np.stack(picks), titles, path, columns=per_class)


def reliability_diagram(bins: list[tuple[float, float, int]], ece: float, path: Path) -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with the ECE."""
    n = len(bins)
    edges = np.linspace(0, 1, n + 1)
    acc = [a if c else 0.0 for _, a, c in bins]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar(edges[:-1], acc, width=1 / n, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {ece:.4f}, {n} bins)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def short_label(text: str, width: int = 36) -> str:
    """``text`` cut in the middle to at most ``width`` characters (``abc…xyz``), so run names fit beside a plot."""
    text = str(text)
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def scatter(x, y, labels, xlabel: str, ylabel: str, path: Path, log_x: bool = False) -> Path:
    """Labelled points (None values skipped), saved to ``path``."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for xi, yi, label in zip(x, y, labels):
        if xi is not None and yi is not None:
            ax.scatter(xi, yi)
            ax.annotate(short_label(label), (xi, yi), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heatmap(values: np.ndarray, rows, columns, title: str, path: Path) -> Path:
    """A (rows x columns) matrix of values in 0..1 with the values written in, saved to ``path``."""
    fig, ax = plt.subplots(figsize=(3.5 + 0.7 * len(columns), 1.8 + 0.4 * len(rows)))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), [short_label(c, 16) for c in columns], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [short_label(r) for r in rows], fontsize=7)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if values[i, j] < 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
