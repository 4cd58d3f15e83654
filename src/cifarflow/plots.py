"""Figures saved as PNG: training curves, confusion matrix, image grids, comparison and study plots.

Every figure has a title naming the run, study or comparison it shows, the
metric's name on its value axis, integer ticks where the axis counts (epochs,
trials) and text of at least 8 pt.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

FONT = 9  # smallest text in a figure, pt
# dark blue (low) to green (high): viridis without its pale yellow end, so every line shows on white
LINES = matplotlib.colors.ListedColormap(plt.get_cmap("viridis")(np.linspace(0.0, 0.8, 256)), name="viridis_dark")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fit(fig, text: str) -> str:
    """``text`` (lines) cut in the middle to what a 12-pt title can show across ``fig``'s width."""
    width = int(fig.get_figwidth() * 7.5)
    return "\n".join(short_label(line, width) for line in str(text).split("\n"))


def _integer_ticks(axis) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def training_curves(history: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Loss, accuracy and learning rate per epoch, saved to ``path``.

    Args:
        history: per-epoch lists ``train_loss``, ``val_loss``, ``train_accuracy``,
            ``val_accuracy`` and ``lr`` (any may be missing); index 0 is epoch 1,
            as the console counts.
        title: the run, e.g. ``cnn_small-epochs30 (run 0123abcd)``.

    The epoch with the best ``val_accuracy`` is marked on every panel.
    """
    panels = [("loss", "loss"), ("accuracy", "accuracy")] + ([("lr", "learning rate")] if history.get("lr") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    val = history.get("val_accuracy") or []
    best = int(np.argmax(val)) + 1 if val else None
    for ax, (key, label) in zip(axes[0], panels):
        series = [("train", history.get(f"train_{key}")), ("val", history.get(f"val_{key}"))] if key != "lr" \
            else [("lr", history.get("lr"))]
        for name, values in series:
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=name)
        if best:
            ax.axvline(best, color="gray", ls="--", lw=1, label=f"best epoch {best} (val_accuracy {val[best - 1]:.4f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=FONT)
    fig.suptitle(_fit(fig, title or "training curves"))
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(cm: np.ndarray, class_names, path: Path, title: str = "") -> Path:
    """Confusion matrix (rows true, columns predicted) with counts, saved to ``path`` (scikit-learn's
    ``ConfusionMatrixDisplay``); ``title`` names the run."""
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(class_names)
    side = max(5.0, 0.65 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    display = ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", values_format="d", xticks_rotation=45, text_kw={"fontsize": FONT}, colorbar=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    bar = fig.colorbar(display.im_, ax=ax, label="test images")
    _integer_ticks(bar.ax.yaxis)
    ax.set_title(_fit(fig, f"confusion matrix\n{title}" if title else "confusion matrix"))
    fig.tight_layout()
    return _save(fig, path)


def image_grid(images: np.ndarray, titles: list[str], path: Path, columns: int = 8, title: str = "") -> Path:
    """uint8 images (N, H, W, 3) in a grid, each with a caption (may hold a newline), saved to ``path``."""
    n = max(1, len(images))
    rows = -(-n // columns)
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.7, rows * (1.6 + 0.3 * lines) + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, caption in zip(axes.flat, images, titles):
        ax.imshow(img)
        ax.set_title(caption, fontsize=FONT)
    if title:
        fig.suptitle(_fit(fig, title))
    fig.tight_layout()
    return _save(fig, path)


def misclassified_grid(x, y_true, probs, class_names, path: Path, count: int = 32, title: str = "") -> Path:
    """The ``count`` most confident mistakes, captioned ``true <class>`` / ``pred <class> <p>``."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    wrong = wrong[np.argsort(-probs[wrong, y_pred[wrong]])][:count]
    heading = f"most confident mistakes: {title}" if title else "most confident mistakes"
    if not len(wrong):
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no misclassified test images ({len(y_true)} tested)", ha="center", va="center")
        ax.set_title(_fit(fig, heading))
        return _save(fig, path)
    captions = [f"true {class_names[y_true[i]]}\npred {class_names[y_pred[i]]} {probs[i, y_pred[i]]:.2f}" for i in wrong]
    return image_grid(x[wrong], captions, path, title=heading)


def samples_per_class(x, y, class_names, path: Path, per_class: int = 8, seed: int = 0, title: str = "") -> Path:
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
    return image_grid(np.stack(picks), titles, path, columns=per_class, title=title)


def reliability_diagram(bins: list[tuple[float, float, int]], ece: float, path: Path, title: str = "") -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with the ECE."""
    n = len(bins)
    edges = np.linspace(0, 1, n + 1)
    acc = [a if c else 0.0 for _, a, c in bins]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.bar(edges[:-1], acc, width=1 / n, align="edge", edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(_fit(fig, f"reliability: ECE {ece:.4f}, {n} bins\n{title}" if title else
                      f"reliability (ECE {ece:.4f}, {n} bins)"))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=FONT)
    fig.tight_layout()
    return _save(fig, path)


def short_label(text: str, width: int = 36) -> str:
    """``text`` cut in the middle to at most ``width`` characters (``abc…xyz``), so run names fit beside a plot."""
    text = str(text)
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def human_number(value: float, _pos=None) -> str:
    """``950``, ``18k``, ``1.5M``: a count as a tick label."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def scatter(x, y, labels, xlabel: str, ylabel: str, path: Path, log_x: bool = False, title: str = "") -> Path:
    """Labelled points (None values skipped), saved to ``path``.

    With ``log_x`` the x axis is logarithmic with 1-2-5 ticks written as
    ``18k``/``1.5M``. Labels sit right of their point, or left of it in the
    right half of the plot, so none runs past the frame.
    """
    points = [(xi, yi, label) for xi, yi, label in zip(x, y, labels) if xi is not None and yi is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, (xi, yi, _) in enumerate(points):
        ax.scatter(xi, yi, color=plt.get_cmap("tab10")(i % 10), zorder=3)
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(human_number))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if points:
            lo, hi = min(p[0] for p in points), max(p[0] for p in points)
            ax.set_xlim(lo / 1.6, hi * 1.6)
    else:
        ax.margins(x=0.12)
    ax.margins(y=0.15)
    fig.canvas.draw()  # limits final: place the labels
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    fx = (lambda v: math.log(v / x0) / math.log(x1 / x0)) if log_x else (lambda v: (v - x0) / (x1 - x0))
    for i, (xi, yi, label) in enumerate(points):
        left = fx(xi) > 0.5  # right half: label to the left of the point
        below = (yi - y0) / (y1 - y0) > 0.85
        ax.annotate(short_label(label), (xi, yi), fontsize=FONT, textcoords="offset points",
                    xytext=(-6 if left else 6, -12 if below else 6), ha="right" if left else "left",
                    va="top" if below else "bottom")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(_fit(fig, title or f"{ylabel} vs {xlabel}"))
    fig.tight_layout()
    return _save(fig, path)


def heatmap(values: np.ndarray, rows, columns, title: str, path: Path, colorbar_label: str = "") -> Path:
    """A (rows x columns) matrix of values in 0..1 with the values written in, saved to ``path``."""
    fig, ax = plt.subplots(figsize=(4.5 + 0.8 * len(columns), 2.2 + 0.45 * len(rows)))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), [short_label(c, 16) for c in columns], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [short_label(r) for r in rows], fontsize=FONT)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=FONT,
                    color="white" if values[i, j] < 0.6 else "black")
    ax.set_title(_fit(fig, title))
    fig.colorbar(im, ax=ax, label=colorbar_label)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- Optuna studies


def _finished(study):
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]


def optimization_history(study, metric: str, path: Path, title: str = "") -> Path:
    """Each complete trial's value of ``metric`` by trial number, with the best so far, saved to ``path``."""
    trials = _finished(study)
    maximize = study.direction.name == "MAXIMIZE"
    fig, ax = plt.subplots(figsize=(8, 4.8))
    numbers = [t.number for t in trials]
    values = [t.value for t in trials]
    ax.scatter(numbers, values, label=f"trial's {metric}", zorder=3)
    if values:
        best = (np.maximum if maximize else np.minimum).accumulate(values)
        ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    _integer_ticks(ax.xaxis)
    ax.margins(x=0.05, y=0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=FONT)
    ax.set_title(_fit(fig, title or f"study {study.study_name}"))
    fig.tight_layout()
    return _save(fig, path)


def _axis_values(trials, name: str, distribution):
    """Trial values of param ``name`` on a 0..1 axis, and the axis' tick labels (bottom, top, categories)."""
    import optuna

    raw = [t.params.get(name) for t in trials]
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        choices = list(distribution.choices)
        span = max(len(choices) - 1, 1)
        return [choices.index(v) / span if v in choices else np.nan for v in raw], \
            [(i / span, str(c)) for i, c in enumerate(choices)]
    low, high = distribution.low, distribution.high
    log = getattr(distribution, "log", False)
    f = (lambda v: math.log(v)) if log else (lambda v: v)
    scale = (f(high) - f(low)) or 1.0
    return [(f(v) - f(low)) / scale if v is not None else np.nan for v in raw], \
        [(0.0, f"{low:.3g}"), (1.0, f"{high:.3g}")]


def parallel_coordinate(study, metric: str, path: Path, title: str = "") -> Path:
    """One line per complete trial across the searched params, coloured by ``metric`` (viridis), saved to ``path``.

    Each vertical axis spans its param's search range (log-scaled where the
    search is, categories evenly spaced); its range is written at its ends.
    """
    from matplotlib.collections import LineCollection

    trials = _finished(study)
    names = sorted({k for t in trials for k in t.params})
    distributions = {}
    for t in trials:
        distributions.update(t.distributions)
    columns, ticks = [], []
    for name in names:
        values, labels = _axis_values(trials, name, distributions[name])
        columns.append(values)
        ticks.append(labels)
    values = np.array([t.value for t in trials], dtype=float)
    lo, hi = (values.min(), values.max()) if len(values) else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    objective = (values - lo) / (hi - lo)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.8 * (len(names) + 1)), 5))
    xs = np.arange(len(names) + 1)
    segments = [np.column_stack([xs, [objective[i]] + [c[i] for c in columns]]) for i in range(len(trials))]
    order = np.argsort(values)  # best drawn last, on top
    lines = LineCollection([segments[i] for i in order], cmap=LINES, linewidths=2, alpha=0.9)
    lines.set_array(values[order])
    lines.set_clim(lo, hi)
    ax.add_collection(lines)
    for x in xs:
        ax.axvline(x, color="black", lw=0.8)
    for x, labels in zip(xs[1:], ticks):
        for y, text in labels:
            ax.annotate(text, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=FONT, va="center",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.annotate(f"{hi:.4g}", (0, 1), xytext=(4, 0), textcoords="offset points", fontsize=FONT, va="center")
    ax.annotate(f"{lo:.4g}", (0, 0), xytext=(4, 0), textcoords="offset points", fontsize=FONT, va="center")
    ax.set_xticks(xs, [metric] + names, rotation=20, ha="right")
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(names) + 0.6)
    ax.set_ylim(-0.05, 1.05)
    fig.colorbar(lines, ax=ax, label=metric)
    ax.set_title(_fit(fig, title or f"study {study.study_name}"))
    fig.tight_layout()
    return _save(fig, path)
