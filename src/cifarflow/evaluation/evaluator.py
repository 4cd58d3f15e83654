"""Evaluation runs (`cifarflow evaluate`): score a logged or registered model on its test set and log a linked MLflow run."""

from __future__ import annotations

import json

import mlflow

from cifarflow import tracking
from cifarflow.evaluation import ensemble
from cifarflow.evaluation.scoring import BATCH_SIZE, check_tta, keras_functions, log_scored, score
from cifarflow.tracking.refs import load_keras, resolve_model, run_test_data

EXPERIMENT = "cifarflow/evaluation"


def evaluate(ref: str, *, data: str | None = None, tta: str = "none", fgsm_images: int = 1000,
             batch_size: int = BATCH_SIZE, seed: int = 0) -> tuple[str, dict[str, float]]:
    """Evaluate a model on the test split of the data it was trained on and log an MLflow run.

    Metrics: those of :func:`cifarflow.evaluation.scoring.score` (``test_loss``
    = ``nll``, the test negative log-likelihood, as the training run logged it),
    with ``robust_accuracy_fgsm`` at eps 2/255 and 8/255
    (logged with step 2 and 8) on a fixed seeded subset of ``fgsm_images``
    test images. Artifacts: see :func:`log_scored`. The run (experiment
    ``cifarflow/evaluation``) is tagged ``cifarflow.source_run_id`` and
    ``cifarflow.model_uri``. A voting ensemble (a run of `cifarflow
    ensemble`) is scored through its members, as :func:`cifarflow.evaluation.ensemble.ensemble` does.

    Returns:
        ``(evaluation_run_id, metrics)``; FGSM figures under
        ``robust_accuracy_fgsm_<eps>``.

    Raises:
        CifarflowError: unknown model reference, other test data than the
            model's, or a ``tta`` other than none/flip.
    """
    check_tta(tta)
    tracking.configure()
    model_uri, run_id = resolve_model(ref)
    source = mlflow.tracking.MlflowClient().get_run(run_id)
    if source.data.tags.get("cifarflow.recipe") == "ensemble":
        ds, predict, attack = ensemble.scorer(source.data.params["members"].split(","), source.data.params["method"],
                                              json.loads(source.data.params["weights"]), data, batch_size)
    else:
        ds = run_test_data(source, data)
        predict, attack = keras_functions(load_keras(model_uri), batch_size)
    scored = score(ds, predict, attack, tta=tta, fgsm_images=fgsm_images, seed=seed)

    tracking.use_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"evaluate-{source.info.run_name}") as run:
        mlflow.set_tags({"cifarflow.source_run_id": run_id, "cifarflow.model_uri": model_uri,
                         "cifarflow.dataset_sha256": ds.checksum,
                         "cifarflow.recipe": source.data.tags.get("cifarflow.recipe", "")})
        mlflow.log_params({"model": ref, "tta": tta, "fgsm_images": min(fgsm_images, len(ds.y_test)),
                           "test_images": len(ds.y_test)})
        log_scored(scored, ds)
    return run.info.run_id, scored.metrics


