"""Side-by-side comparison of finished training runs: table (Markdown, CSV), plots, a `comparison` run."""

from __future__ import annotations

import csv
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from cifarflow import plots, tracking
from cifarflow.errors import CifarflowError
from cifarflow.tracking.refs import load_keras

COLUMNS = ("run", "recipe", "param_count", "trainable_param_count", "test_accuracy", "test_accuracy_tta",
           "train_val_gap", "ece", "train_seconds", "images_per_second", "model_mb", "latency_ms", "run_id")
# How the Markdown table shows each numeric column (the CSV keeps full precision).
DISPLAY = {"param_count": "{:,.0f}", "trainable_param_count": "{:,.0f}", "test_accuracy": "{:.4f}",
           "test_accuracy_tta": "{:.4f}", "train_val_gap": "{:+.4f}", "ece": "{:.4f}", "train_seconds": "{:.1f}",
           "images_per_second": "{:,.0f}", "model_mb": "{:.2f}", "latency_ms": "{:.2f}"}
FROM_EVALUATION = ("test_accuracy_tta", "ece")  # taken from the newest `cifarflow evaluate` run that logged them


def _last(client, run_id: str, key: str) -> float | None:
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: (m.step, m.timestamp)).value if history else None


def _model_mb(model_uri: str) -> float | None:
    """Size on disk of a logged model's files, in MB (local artifact stores only)."""
    try:
        location = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
        root = Path(location.removeprefix("file://"))
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6 if root.is_dir() else None
    except Exception:
        return None


def _latency_ms(model_uri: str, repeats: int = 50) -> float:
    """Median batch-1 prediction time in ms, after warm-up: a Keras model called directly, a pyfunc model's predict."""
    try:
        keras_model = load_keras(model_uri)
        predict = lambda x: np.asarray(keras_model(x, training=False))  # noqa: E731
    except CifarflowError:  # a pyfunc model (an ensemble): its own predict
        predict = mlflow.pyfunc.load_model(model_uri).predict
    x = np.zeros((1, 32, 32, 3), np.float32)
    for _ in range(5):
        predict(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def collect(experiments: list[str] | None = None, metric: str = "test_accuracy",
            latency: bool = False) -> list[dict]:
    """One row per finished training run (with ``metric``) of the given experiments.

    Args:
        experiments: experiment names (``cifarflow/<recipe>`` or a bare recipe
            name); every ``cifarflow/*`` experiment except tooling ones when None.
        metric: the ranking metric, descending.
        latency: also time batch-1 predictions (loads each model).

    Returns:
        Rows with the :data:`COLUMNS` keys (None where a run lacks a figure),
        best first; tuning trials are left out. ``train_val_gap`` is last ``train_accuracy`` minus last
        ``val_accuracy``; ``ece`` and ``test_accuracy_tta`` come from the newest
        ``cifarflow evaluate`` run of the model that logged them, else from the run itself (training
        runs and ensembles log their ece, training runs with ``tta`` their tta); ``images_per_second``
        is the median over epochs.

    Raises:
        CifarflowError: an unknown experiment, or no run to compare.
    """
    tracking.configure()
    client = mlflow.tracking.MlflowClient()
    tooling = {"cifarflow/evaluation", "cifarflow/export", "cifarflow/comparison"}
    if experiments:
        found = []
        for name in experiments:
            exp = client.get_experiment_by_name(name) or client.get_experiment_by_name(tracking.experiment_name(name))
            if exp is None:
                raise CifarflowError(f"no experiment '{name}'", "pass names such as cifarflow/cnn_small")
            found.append(exp)
    else:
        found = [e for e in client.search_experiments() if e.name.startswith("cifarflow/") and e.name not in tooling]
    runs = client.search_runs([e.experiment_id for e in found],
                              filter_string=f"attributes.status = 'FINISHED' and metrics.`{metric}` > -1e300",
                              order_by=[f"metrics.`{metric}` DESC"]) if found else []
    evaluations: dict[str, dict[str, float]] = {}  # source run id -> the newest evaluation's value of each metric
    evaluation_exp = client.get_experiment_by_name("cifarflow/evaluation")
    if evaluation_exp:
        for ev in client.search_runs([evaluation_exp.experiment_id], order_by=["attributes.start_time DESC"]):
            newest = evaluations.setdefault(ev.data.tags.get("cifarflow.source_run_id"), {})
            for key in FROM_EVALUATION:
                if key in ev.data.metrics:
                    newest.setdefault(key, ev.data.metrics[key])
    rows = []
    for run in runs:
        m, tags = run.data.metrics, run.data.tags
        if "cifarflow.trial" in tags:  # tuning trials are search steps, not models to compare
            continue
        train_acc, val_acc = _last(client, run.info.run_id, "train_accuracy"), _last(client, run.info.run_id, "val_accuracy")
        ips = [x.value for x in client.get_metric_history(run.info.run_id, "images_per_second")]
        uri = tags.get("cifarflow.model_uri")
        evaluated = {k: evaluations.get(run.info.run_id, {}).get(k, m.get(k)) for k in FROM_EVALUATION}
        rows.append({
            "run": run.info.run_name, "recipe": tags.get("cifarflow.recipe"),
            "param_count": m.get("param_count", m.get("params")),  # `params` before 2026-11
            "trainable_param_count": m.get("trainable_param_count", m.get("trainable_params")),
            "test_accuracy": m.get("test_accuracy"), **evaluated,
            "train_val_gap": train_acc - val_acc if train_acc is not None and val_acc is not None else None,
            "train_seconds": m.get("train_seconds"),
            "images_per_second": statistics.median(ips) if ips else None,
            "model_mb": _model_mb(uri) if uri else None,
            "latency_ms": _latency_ms(uri) if latency and uri else None, "run_id": run.info.run_id,
        })
    if not rows:
        raise CifarflowError(f"no finished run with '{metric}' to compare", "train some runs, or pick --experiments")
    return rows


def _fmt(column: str, value) -> str:
    if value is None:
        return ""
    return DISPLAY[column].format(value) if column in DISPLAY else str(value)


def to_markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table with the :data:`COLUMNS` header, numbers rounded as :data:`DISPLAY` says."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    """The rows as CSV with the :data:`COLUMNS` header (raw values)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _per_class(rows: list[dict]) -> tuple[list[str], list[str], np.ndarray] | None:
    """Recall per class (= per-class accuracy) of each run, from its classification_report.json."""
    labels, names, values = [], None, []
    for row in rows:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = mlflow.artifacts.download_artifacts(run_id=row["run_id"], artifact_path="classification_report.json",
                                                           dst_path=tmp)
                report = json.loads(Path(path).read_text())
        except Exception:
            continue
        classes = [k for k, v in report.items() if isinstance(v, dict) and k not in ("macro avg", "weighted avg")]
        if names is None:
            names = classes
        if classes == names:
            labels.append(row["run"])
            values.append([report[c]["recall"] for c in names])
    return (labels, names, np.array(values)) if values else None


def compare(experiments: list[str] | None = None, metric: str = "test_accuracy", out: Path | None = None,
            latency: bool = False) -> tuple[str, list[dict]]:
    """Write the comparison (``comparison.md``, ``comparison.csv``, ``accuracy_vs_params.png``,
    ``accuracy_vs_train_time.png``, ``per_class_accuracy.png``) to ``out`` (``comparison/`` when None)
    and log it as the artifacts of a run in experiment ``cifarflow/comparison``.

    Returns:
        ``(comparison_run_id, rows)``.

    Raises:
        CifarflowError: see :func:`collect`.
    """
    rows = collect(experiments, metric, latency)
    out = Path(out or "comparison")
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(to_markdown(rows))
    (out / "comparison.csv").write_text(to_csv(rows))
    which = f"{len(rows)} runs of {', '.join(sorted({r['recipe'] or '?' for r in rows}))}"
    accuracy, labels = [r["test_accuracy"] for r in rows], [r["run"] for r in rows]
    plots.scatter([r["param_count"] for r in rows], accuracy, labels, "parameters (log scale)", "test_accuracy",
                  out / "accuracy_vs_params.png", log_x=True, title=f"test_accuracy vs parameters: {which}")
    plots.scatter([r["train_seconds"] for r in rows], accuracy, labels, "training wall time (s)", "test_accuracy",
                  out / "accuracy_vs_train_time.png", title=f"test_accuracy vs training time: {which}")
    per_class = _per_class(rows)
    if per_class:
        plots.heatmap(per_class[2], per_class[0], per_class[1], f"per-class test accuracy: {which}",
                      out / "per_class_accuracy.png", colorbar_label="accuracy (recall) of the class")
    tracking.use_experiment("cifarflow/comparison")
    with mlflow.start_run(run_name=f"comparison-{len(rows)}-runs") as run:
        mlflow.set_tag("cifarflow.compared_runs", ",".join(r["run_id"] for r in rows)[:5000])
        mlflow.log_params({"metric": metric, "runs": len(rows)})
        mlflow.log_artifacts(str(out))
    return run.info.run_id, rows
