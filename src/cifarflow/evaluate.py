"""Evaluation runs: score a logged or registered model on its test set and log a linked MLflow run."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from cifarflow import evaluation, plots, registry, tracking
from cifarflow.errors import CifarflowError

EXPERIMENT = "cifarflow/evaluation"
FGSM_EPS = (2, 8)  # in 1/255 of the pixel range, i.e. pixel units
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_model(ref: str) -> tuple[str, str]:
    """``(model_uri, source_run_id)`` of ``models:/m-...``, ``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/<run_id>[/...]`` or a bare run id.

    Raises:
        CifarflowError: unknown model, version, alias or run.
    """
    if ref.startswith("runs:/"):
        ref = ref.removeprefix("runs:/").split("/", 1)[0]
    if _RUN_ID.match(ref) or ref.startswith("models:/m-"):
        source = registry.resolve_source(ref)
        return source.model_uri, source.run_id
    version = registry.resolve_version(ref)
    if not version.run_id:
        raise CifarflowError(f"registered version {ref} has no source run", "register a run of `cifarflow train`")
    return version.uri, version.run_id


def evaluate(ref: str, *, data: str | None = None, tta: str = "none", fgsm_images: int = 1000,
             batch_size: int = 256, seed: int = 0) -> tuple[str, dict[str, float]]:
    """Evaluate a model on the test split of the data it was trained on and log an MLflow run.

    Metrics: ``test_accuracy``, ``test_loss`` (= ``nll``, mean cross-entropy
    in nats), ``macro_precision``, ``macro_recall``, ``macro_f1``, ``ece``
    (15 bins), ``accuracy_<class>`` per class, ``test_accuracy_tta`` with
    ``tta="flip"``, and ``robust_accuracy_fgsm`` at eps 2/255 and 8/255
    (logged with step 2 and 8) on a fixed seeded subset of ``fgsm_images``
    test images. Artifacts: confusion matrix, reliability diagram, the most
    confident mistakes, the per-class report (JSON and CSV) and
    ``metrics.md``. The run (experiment ``cifarflow/evaluation``) is tagged
    ``cifarflow.source_run_id`` and ``cifarflow.model_uri``.

    Returns:
        ``(evaluation_run_id, metrics)``; FGSM figures under
        ``robust_accuracy_fgsm_<eps>``.

    Raises:
        CifarflowError: unknown model reference, other test data than the
            model's, or a ``tta`` other than none/flip.
    """
    if tta not in ("none", "flip"):
        raise CifarflowError(f"unknown tta '{tta}'", "use --tta none or --tta flip")
    tracking.configure()
    model_uri, run_id = resolve_model(ref)
    source = mlflow.tracking.MlflowClient().get_run(run_id)
    ds = registry.run_test_data(source, data)
    model = registry.load_keras(model_uri)

    probs = evaluation.predict(model, ds.x_test, batch_size=batch_size)
    scores = evaluation.classification_metrics(ds.y_test, probs, ds.class_names)
    bins = evaluation.reliability_bins(ds.y_test, probs)
    ece = evaluation.expected_calibration_error(ds.y_test, probs)
    cm = scores["confusion_matrix"]
    report = scores["report"]
    metrics = {
        "test_accuracy": scores["accuracy"], "test_loss": scores["nll"], "nll": scores["nll"], "ece": ece,
        "macro_precision": report["macro avg"]["precision"], "macro_recall": report["macro avg"]["recall"],
        "macro_f1": scores["macro_f1"],
    }
    per_class = cm.diagonal() / np.maximum(cm.sum(axis=1), 1)
    metrics.update({f"accuracy_{name}": float(a) for name, a in zip(ds.class_names, per_class)})
    if tta == "flip":
        tta_probs = evaluation.predict(model, ds.x_test, tta="flip", batch_size=batch_size)
        metrics["test_accuracy_tta"] = float((tta_probs.argmax(1) == ds.y_test).mean())
    subset = np.sort(np.random.default_rng(seed).permutation(len(ds.y_test))[:fgsm_images])
    for eps in FGSM_EPS:
        adversarial = evaluation.fgsm(model, ds.x_test[subset], ds.y_test[subset], eps)
        adv_probs = evaluation.predict(model, adversarial, batch_size=batch_size)
        metrics[f"robust_accuracy_fgsm_{eps}"] = float((adv_probs.argmax(1) == ds.y_test[subset]).mean())

    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"evaluate-{source.info.run_name}") as run:
        mlflow.set_tags({"cifarflow.source_run_id": run_id, "cifarflow.model_uri": model_uri,
                         "cifarflow.dataset_sha256": ds.checksum,
                         "cifarflow.recipe": source.data.tags.get("cifarflow.recipe", "")})
        mlflow.log_params({"model": ref, "tta": tta, "fgsm_images": len(subset), "test_images": len(ds.y_test)})
        mlflow.log_metrics({k: v for k, v in metrics.items() if not k.startswith("robust_accuracy_fgsm_")})
        for eps in FGSM_EPS:
            mlflow.log_metric("robust_accuracy_fgsm", metrics[f"robust_accuracy_fgsm_{eps}"], step=eps)
        table = format_table(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            plots.confusion_matrix(cm, ds.class_names, out / "confusion_matrix.png")
            plots.reliability_diagram(bins, ece, out / "reliability_diagram.png")
            plots.misclassified_grid(ds.x_test, ds.y_test, probs, ds.class_names, out / "misclassified.png")
            (out / "classification_report.json").write_text(json.dumps(report, indent=2))
            (out / "classification_report.csv").write_text(evaluation.report_csv(report))
            (out / "metrics.md").write_text(table)
            mlflow.log_artifacts(tmp)
    return run.info.run_id, metrics


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as a Markdown table (``metric | value``), one row each."""
    rows = ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    return "\n".join(rows) + "\n"
