"""The Python API: the command line's verbs as functions, for notebooks and scripts.

Each function is a thin wrapper over the module that does the work (imported on
first use, so ``import cifarflow`` stays light) and takes the same settings as
the command of the same name. Runs go to the MLflow store of
``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory;
problems a user can fix raise :class:`cifarflow.errors.CifarflowError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def train(recipe: str, *, data: str | None = None, epochs: int | None = None, limit: int | None = None,
          seed: int | None = None, quiet: bool = True, run_name: str | None = None, **overrides: Any):
    """Train a recipe (``cifarflow train``) and log one MLflow run.

    Args:
        recipe: a name in ``experiments/`` (``cnn_small``) or a path to a ``.yaml`` recipe.
        data: data source (``cifar10``, a folder or an archive); the recipe's when None.
        epochs: total epochs (on a two-phase recipe, split between its phases).
        limit: use only this many training images (stratified sample).
        seed: random seed (the recipe's, 42, when None).
        quiet: no progress bar.
        run_name: MLflow run name (:func:`cifarflow.tracking.run_name`, as the CLI names it, when None).
        **overrides: any recipe setting or model parameter (``width=0.25``, ``label_smoothing=0``).

    Returns:
        ``cifarflow.training.trainer.TrainResult``: ``run_id``, ``model_uri``
        (``models:/<model_id>``) and the final ``metrics`` (``test_accuracy``,
        ``test_loss`` = the test negative log-likelihood, ...).
    """
    from cifarflow import config
    from cifarflow.training import trainer

    given = {"data": data, "epochs": epochs, "limit": limit, "seed": seed}
    resolved = config.resolve(recipe, {**{k: v for k, v in given.items() if v is not None}, **overrides})
    return trainer.train(resolved, quiet=quiet, run_name=run_name)


def tune(recipe: str, study: str, trials: int, **options: Any):
    """Run or join an Optuna study over a recipe (``cifarflow tune``); see
    :func:`cifarflow.training.tuning.tune` for ``options`` (``overrides``, ``storage``, ``timeout``...).

    Returns:
        The ``optuna.Study``.
    """
    from cifarflow.training import tuning

    return tuning.tune(recipe, study, trials, **options)


def evaluate(model: str, *, data: str | None = None, tta: str = "none", fgsm_images: int = 1000) -> dict[str, float]:
    """Score a model on the test split of its data and log an evaluation run (``cifarflow evaluate``).

    Args:
        model: ``models:/m-...``, ``models:/NAME@ALIAS``, ``NAME/VERSION``, ``runs:/RUN_ID`` or a run id.
        data: the model's data at another path (checked by sha256).
        tta: ``none``, ``flip`` or ``multiview``.
        fgsm_images: size of the fixed test subset for FGSM robustness.

    Returns:
        The metrics of the evaluation run: ``test_accuracy``, ``test_loss`` (= ``nll``, as
        the training run logged it), ``ece``, ``macro_f1``, ``accuracy_<class>``,
        ``robust_accuracy_fgsm_2``/``_8``, ...
    """
    from cifarflow.evaluation import evaluator

    return evaluator.evaluate(model, data=data, tta=tta, fgsm_images=fgsm_images)[1]


def compare(experiments: Sequence[str] | None = None, *, metric: str = "test_accuracy",
            out: str | Path = "comparison", latency: bool = False) -> list[dict]:
    """Tabulate finished runs side by side and log a comparison run (``cifarflow compare``).

    Returns:
        One dict per run, best ``metric`` first (keys: ``cifarflow.evaluation.compare.COLUMNS``).
    """
    from cifarflow.evaluation import compare as comparison

    return comparison.compare(list(experiments) if experiments else None, metric, Path(out), latency)[1]


def ensemble(models: Sequence[str], *, method: str = "soft", weights: Sequence[float] | None = None, **options: Any):
    """Combine models by voting, score and log the ensemble as a pyfunc model (``cifarflow ensemble``).

    Returns:
        ``cifarflow.evaluation.ensemble.EnsembleResult`` (``run_id``, ``model_uri``, ``metrics``,
        ``member_accuracy``).
    """
    from cifarflow.evaluation import ensemble as voting_ensemble

    return voting_ensemble.ensemble(list(models), method, weights, **options)


def register(source: str | None = None, *, best_of: str | None = None, metric: str = "test_accuracy",
             name: str | None = None):
    """Register a logged model (a ``models:/m-...`` URI or run id, or the best run of an experiment)
    as the ``challenger`` of its registered model (``cifarflow register``).

    Returns:
        ``cifarflow.tracking.refs.VersionRef`` (``name``, ``version``, ``run_id``, ``uri``).
    """
    from cifarflow.deploy import registry
    from cifarflow.tracking import refs

    return registry.register(refs.resolve_source(source, best_of=best_of, metric=metric), name)


def promote(name: str, *, force: bool = False):
    """Move ``champion`` to the ``challenger`` if ``registry/policy.yaml`` allows it (``cifarflow promote``).

    Returns:
        ``cifarflow.deploy.registry.Decision`` (``promoted``, ``reason``, both metric values).
    """
    from cifarflow.deploy import registry

    return registry.promote(name, force=force)


def export(model: str, formats: Sequence[str] = ("onnx", "tflite"), quantize: Sequence[str] = ("none",), *,
           out: str | Path | None = None, data: str | None = None):
    """Export a registered version to ONNX/TFLite files checked against Keras (``cifarflow export``).

    Returns:
        The list of ``cifarflow.deploy.export.ExportResult`` (one per file: path, size, parity figures).
    """
    from cifarflow.deploy import export as exporter

    return exporter.export(model, list(formats), list(quantize), out_dir=Path(out) if out else None, data=data)[0]


def pull(model: str, dest: str | Path, *, fmt: str = "keras", quantize: str = "none") -> Path:
    """Download a registered version for deployment, with its ``model_card.json`` (``cifarflow pull``).

    Returns:
        The path of the model file in ``dest``.
    """
    from cifarflow.deploy import pull as puller

    return puller.pull(model, fmt, Path(dest), quantize=quantize)


def predict(model: str, paths: Sequence[str | Path], *, out: str | Path | None = None, batch_size: int = 256,
            tta: str = "none", skip_corrupt: bool = False):
    """The labels of image files, folders (recursive) and .tar.gz/.zip archives by a model (``cifarflow predict``).

    Args:
        model: ``NAME@ALIAS``, ``models:/...``, ``runs:/RUN_ID`` or a run id (a Keras model or an ensemble).
        paths: image files, folders, archives.
        out: also write the table there (.csv, .json or .parquet).
        batch_size, tta, skip_corrupt: as the command's options.

    Returns:
        A pandas DataFrame: ``path``, ``label``, ``probability``, one probability column per class.

    Raises:
        CifarflowError: an unknown model, a missing path, no image, unreadable
            images (unless ``skip_corrupt``), an unknown ``out`` format.
    """
    from cifarflow.deploy import predict as predictor

    return predictor.predict(model, [str(p) for p in paths], None if out is None else str(out), batch_size=batch_size,
                             tta=tta, skip_corrupt=skip_corrupt, progress=False).table


def load_model(model: str):
    """The Keras model of a reference (as :func:`evaluate` takes): raw 0..255 pixels
    ``(batch, 32, 32, 3)`` in, softmax probabilities out."""
    from cifarflow import tracking
    from cifarflow.tracking import refs

    tracking.configure()
    return refs.load_keras(refs.resolve_model(model)[0])
