"""Plots a person can read (issue 16 item 5): a title naming the run or study, integer ticks for counts, the
metric's name on its axis, visible lines, readable text. Each figure is inspected as it is saved; the PNGs
themselves were looked at by eye when the plots changed (see the commit notes)."""

from __future__ import annotations

import matplotlib
import numpy as np
import optuna
import pytest
from matplotlib.colors import to_rgb

from cifarflow import plots


@pytest.fixture
def saved(monkeypatch):
    """Every matplotlib figure saved during the test, captured before it is closed."""
    figures = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


def titles(fig) -> str:
    return " ".join([fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes])


def integer_ticks(axis) -> bool:
    lo, hi = axis.get_view_interval()
    ticks = [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def min_font(fig) -> float:
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip() and t.get_visible()]
    return min(sizes)


def test_training_curves(saved, tmp_path):
    history = {"train_loss": [1.2, 0.9, 0.8], "val_loss": [1.1, 1.0, 1.05], "train_accuracy": [0.4, 0.6, 0.7],
               "val_accuracy": [0.45, 0.55, 0.5], "lr": [0.1, 0.05, 0.01]}
    plots.training_curves(history, tmp_path / "c.png", title="cnn_small-epochs3 (run 0123abcd)")
    fig = saved[-1]
    assert "cnn_small-epochs3" in titles(fig)
    axes = {ax.get_ylabel(): ax for ax in fig.axes}
    assert {"loss", "accuracy", "learning rate"} <= set(axes)
    for ax in axes.values():
        assert integer_ticks(ax.xaxis) and ax.get_xlabel() == "epoch"
        assert min(min(line.get_xdata()) for line in ax.get_lines() if len(line.get_xdata()) == 3) == 1  # epoch 1..3
    legend = " ".join(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
    assert "best epoch 2" in legend  # the best val_accuracy, counted from 1 as the console does
    assert min_font(fig) >= 8


def test_confusion_matrix_and_misclassified(saved, tmp_path):
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 6]])
    plots.confusion_matrix(cm, ["cat", "dog", "ship"], tmp_path / "cm.png", title="run r1")
    assert "run r1" in titles(saved[-1]) and min_font(saved[-1]) >= 8
    x = np.zeros((4, 32, 32, 3), np.uint8)
    probs = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1]])
    plots.misclassified_grid(x, np.array([0, 0, 2, 2]), probs, ["cat", "dog", "ship"], tmp_path / "m.png", title="run r1")
    assert "run r1" in titles(saved[-1]) and min_font(saved[-1]) >= 8
    plots.misclassified_grid(x, np.array([1, 0, 2, 1]), probs, ["cat", "dog", "ship"], tmp_path / "none.png", title="r")
    assert "no misclassified" in " ".join(t.get_text() for t in saved[-1].findobj(matplotlib.text.Text))


def test_comparison_scatter_and_heatmap(saved, tmp_path):
    plots.scatter([18_000, 19_100, 2_300_000], [0.4, 0.9, 0.95], ["simple5-e3", "cnn_small-" + "x" * 40, "resnet20"],
                  "parameters", "test_accuracy", tmp_path / "s.png", log_x=True, title="3 runs of cifarflow/*")
    fig = saved[-1]
    ax = fig.axes[0]
    assert "3 runs" in titles(fig) and ax.get_ylabel() == "test_accuracy"
    fig.canvas.draw()
    frame = ax.get_window_extent()
    for text in ax.texts:  # point labels stay inside the frame
        box = text.get_window_extent()
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1, text.get_text()
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    boxes = [t.get_window_extent() for t in labels]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]  # no overlap
    plots.heatmap(np.array([[0.5, 0.7], [0.9, 0.1]]), ["run-a", "run-b"], ["cat", "dog"], "per-class accuracy",
                  tmp_path / "h.png")
    assert min_font(saved[-1]) >= 8


def study(values, direction="maximize"):
    s = optuna.create_study(direction=direction, study_name="s-demo")
    dist = {"dropout": optuna.distributions.FloatDistribution(0, 0.5),
            "learning_rate": optuna.distributions.FloatDistribution(0.01, 0.3, log=True),
            "width": optuna.distributions.CategoricalDistribution([0.25, 0.5, 0.75])}
    rng = np.random.default_rng(0)
    for v in values:
        params = {"dropout": float(rng.uniform(0, 0.5)), "learning_rate": float(np.exp(rng.uniform(np.log(0.01), np.log(0.3)))),
                  "width": [0.25, 0.5, 0.75][int(rng.integers(3))]}
        s.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=v))
    return s


def test_study_plots(saved, tmp_path):
    s = study([0.31, 0.52, 0.47, 0.55])
    plots.optimization_history(s, "val_accuracy", tmp_path / "h.png", title="study s-demo")
    fig = saved[-1]
    ax = fig.axes[0]
    assert "s-demo" in titles(fig) and ax.get_ylabel() == "val_accuracy" and integer_ticks(ax.xaxis)
    plots.parallel_coordinate(s, "val_accuracy", tmp_path / "p.png", title="study s-demo")
    fig = saved[-1]
    assert "s-demo" in titles(fig)
    # the trials' lines: the plot's own collections that hold segments (not the colorbar's empty dividers, drawn
    # in rcParams' axes.edgecolor: white after another test's `plt.style.use("ggplot")`, a failure in one CI order)
    lines = [c for c in fig.axes[0].collections
             if isinstance(c, matplotlib.collections.LineCollection) and len(c.get_segments())]
    colors = np.concatenate([c.get_colors()[:, :3] for c in lines]) if lines else \
        np.array([to_rgb(line.get_color()) for ax in fig.axes for line in ax.get_lines()])
    luminance = colors @ np.array([0.299, 0.587, 0.114])
    assert len(colors) >= 4 and luminance.max() < 0.8, luminance  # every trial visible on a white ground


def test_the_importances_plot_leaves_the_process_style_as_it_was(tmp_path):
    """Optuna's importance plot calls ``plt.style.use("ggplot")``; after cifarflow's, the process's style is the
    one it had (a tune with --retrain-best drew its training curves in ggplot's grey, and the study plots of a
    later test in the same process got white colorbar dividers)."""
    from cifarflow.training import tuning

    keys = ("axes.facecolor", "axes.edgecolor", "axes.grid", "grid.color", "figure.facecolor", "axes.prop_cycle")
    before = {k: matplotlib.rcParams[k] for k in keys}
    tuning._importances_plot(study([0.31, 0.52, 0.47, 0.55]), "val_accuracy", tmp_path / "i.png", "study s-demo")
    assert (tmp_path / "i.png").stat().st_size > 0
    assert {k: matplotlib.rcParams[k] for k in keys} == before


def test_study_plots_of_one_trial_warn_nothing(saved, tmp_path, recwarn):
    s = study([0.5])
    plots.optimization_history(s, "val_accuracy", tmp_path / "h.png", title="study s-demo")
    plots.parallel_coordinate(s, "val_accuracy", tmp_path / "p.png", title="study s-demo")
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]
