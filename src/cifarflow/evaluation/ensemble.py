"""Voting ensembles of logged models (`cifarflow ensemble`): scored like one model, logged as a pyfunc model."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from cifarflow import serving, tracking
from cifarflow.evaluation.metrics import fgsm, predict_probs
from cifarflow.evaluation import scoring, voting
from cifarflow.tracking.refs import load_keras, resolve_model, run_test_data
from cifarflow.errors import CifarflowError

EXPERIMENT = "cifarflow/ensemble"


@dataclass
class Member:
    """One member: its model URI (``models:/m-...`` or a registered version), training run and Keras model."""

    model_uri: str
    run: mlflow.entities.Run
    model: object


@dataclass
class EnsembleResult:
    """What `cifarflow ensemble` logged: the run, the pyfunc model and the metrics of the ensemble and its members."""

    run_id: str
    model_uri: str
    metrics: dict[str, float]
    member_accuracy: dict[str, float]  # member run name -> test_accuracy on the same test images


def parse_weights(values: Sequence[str] | None, members: int) -> list[float] | None:
    """``--weights`` as floats: ``["2,1"]``, ``["2", "1"]`` or nothing (equal weights, None).

    Raises:
        CifarflowError: not numbers, not one per member, negative, or all zero.
    """
    items = [v.strip() for value in values or () for v in str(value).split(",") if v.strip()]
    if not items:
        return None
    try:
        weights = [float(v) for v in items]
    except ValueError:
        raise CifarflowError(f"--weights {','.join(items)} are not numbers", "pass one number per model, e.g. --weights 2,1") from None
    if len(weights) != members or min(weights) < 0 or sum(weights) <= 0 or not all(np.isfinite(weights)):
        raise CifarflowError(f"--weights {','.join(items)} must be {members} non-negative numbers, not all zero "
                             f"(one per model)", f"pass {members} weights, e.g. --weights {','.join(['1'] * members)}")
    return weights


def load_members(refs: Sequence[str], data: str | None = None):
    """The members' shared test data and :class:`Member` list.

    Args:
        refs: model references as for `cifarflow evaluate` (``models:/m-...``,
            ``models:/NAME@ALIAS``, ``runs:/RUN_ID``, a run id).
        data: the data at another path than the first member's run logged.

    Returns:
        ``(dataset, members)``: the test split of the first member's data (with its class subset).

    Raises:
        CifarflowError: an unknown reference, or members trained on other
            data (dataset sha256), other classes or another number of classes.
    """
    tracking.configure()
    client = mlflow.tracking.MlflowClient()
    resolved = [resolve_model(ref) for ref in refs]
    runs = [client.get_run(run_id) for _, run_id in resolved]
    first = runs[0]
    for ref, run in zip(refs[1:], runs[1:]):
        for what, key, get in (("data (dataset sha256)", "cifarflow.dataset_sha256", lambda r, k: r.data.tags.get(k)),
                               ("classes", "classes", lambda r, k: r.data.params.get(k, "None"))):
            if get(run, key) != get(first, key):
                raise CifarflowError(f"{ref} was trained on other {what} than {refs[0]}",
                                     "ensemble models of the same data and classes")
    ds = run_test_data(first, data)
    members = [Member(uri, run, load_keras(uri)) for (uri, _), run in zip(resolved, runs)]
    for ref, member in zip(refs, members):
        if member.model.output_shape[-1] != ds.num_classes:
            raise CifarflowError(f"{ref} predicts {member.model.output_shape[-1]} classes, the data has {ds.num_classes}",
                                 "ensemble models of the same classes")
    return ds, members


def voting_functions(models: Sequence, method: str, weights: Sequence[float] | None,
                     batch_size: int = scoring.BATCH_SIZE) -> tuple[Callable, Callable]:
    """``(predict, attack)`` of a voting ensemble of Keras models, as :func:`cifarflow.evaluation.scoring.score` takes them.

    ``predict(images, tta)`` combines the members' probabilities with
    :func:`cifarflow.evaluation.voting.combine`. ``attack`` is FGSM against the soft
    (weighted mean) ensemble, white-box for soft voting; hard voting has no
    useful gradient, so its adversarial images are those of the soft
    ensemble of the same members (a transfer attack).
    """
    w = np.ones(len(models)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = [float(x) for x in w / w.sum()]

    def predict(x, tta):
        return voting.combine([predict_probs(m, x, tta=tta, batch_size=batch_size) for m in models], method, w)

    def soft(images, training=False):
        return sum(wi * m(images, training=False) for wi, m in zip(w, models))

    def attack(x, y, eps):
        return fgsm(soft, x, y, eps)

    return predict, attack


def scorer(refs: Sequence[str], method: str, weights: Sequence[float] | None, data: str | None = None,
           batch_size: int = scoring.BATCH_SIZE):
    """``(dataset, predict, attack)`` of the ensemble of ``refs`` (see :func:`load_members`, :func:`voting_functions`)."""
    ds, members = load_members(refs, data)
    return (ds, *voting_functions([m.model for m in members], method, weights, batch_size))


def log_pyfunc(models: Sequence, method: str, weights: Sequence[float], class_names: Sequence[str],
               name: str = "model"):
    """Log the ensemble as an MLflow pyfunc LoggedModel in the active run.

    The model's code is :mod:`cifarflow.evaluation.voting` (self-contained), its
    artifacts the members as ``member_<i>.keras``, its config ``method``,
    ``weights`` and ``class_names``. It takes what one logged Keras model takes
    (:func:`cifarflow.serving.model_input`, logged beside the code): raw pixels
    (N, 32, 32, 3) answered with probabilities (N, C), or a DataFrame column
    ``image`` of encoded images answered with ``label``, ``probability`` and one
    column per class; so, like it, it is logged without a signature (one schema
    cannot hold both, see :func:`cifarflow.tracking.log_keras_model`).
    Requirements are pinned to this environment's mlflow, keras, numpy, pillow and backend.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/<model_id>``).
    """
    import logging

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for i, model in enumerate(models):
            path = Path(tmp) / f"member_{i}.keras"
            model.save(path)
            artifacts[f"member_{i}"] = str(path)
        code = Path(tmp) / f"{serving.LOADER_MODULE}.py"  # voting.py's input checks and decoder, without cifarflow
        shutil.copyfile(serving.__file__, code)
        with tracking.logger_level("mlflow.pyfunc", logging.ERROR):  # "Failed to infer model signature": on purpose
            return mlflow.pyfunc.log_model(
                name=name, python_model=voting.__file__, artifacts=artifacts, code_paths=[str(code)],
                # MLflow also logs the config as run params: `weights` must read as ensemble() logged it
                model_config={"method": method, "weights": [float(w) for w in weights],
                              "class_names": [str(c) for c in class_names]},
                pip_requirements=tracking.model_requirements(),
            )


def ensemble(refs: Sequence[str], method: str = "soft", weights: Sequence[float] | None = None, *,
             data: str | None = None, tta: str = "none", fgsm_images: int = 1000, seed: int = 0,
             batch_size: int = scoring.BATCH_SIZE) -> EnsembleResult:
    """Combine logged models by voting, score the ensemble like one model and log it.

    Soft voting averages the members' probabilities (weighted); hard voting
    counts their top-1 votes (Dietterich 2000, "Ensemble Methods in Machine
    Learning"); see :func:`cifarflow.evaluation.voting.combine`. The run (experiment
    ``cifarflow/ensemble``, recipe tag ``ensemble``) holds the metrics of
    :func:`cifarflow.evaluation.evaluator.evaluate`, ``member_test_accuracy`` (step =
    member index), ``param_count``/``trainable_param_count``/``train_seconds`` summed
    over the members, the same artifacts, and the pyfunc model (tag
    ``cifarflow.model_uri``), which `cifarflow register` registers as
    ``cifarflow-ensemble``.

    Args:
        refs: two or more model references (see :func:`load_members`).
        method: ``soft`` or ``hard``.
        weights: one per member (equal when None; logged as the param ``weights``).
        data, tta, fgsm_images, seed, batch_size: as for :func:`cifarflow.evaluation.evaluator.evaluate`.

    Raises:
        CifarflowError: fewer than two models, an unknown method, bad weights,
            or members that do not share data and classes.
    """
    if len(refs) < 2:
        raise CifarflowError(f"an ensemble needs two or more models, got {len(refs)}", "pass several model URIs or run ids")
    if method not in voting.METHODS:
        raise CifarflowError(f"unknown voting method '{method}'", "use --method soft or --method hard")
    scoring.check_tta(tta)
    weights = parse_weights([",".join(str(w) for w in weights)] if weights else None, len(refs)) or [1.0] * len(refs)
    ds, members = load_members(refs, data)
    models = [m.model for m in members]
    predict, attack = voting_functions(models, method, weights, batch_size)
    member_probs = [predict_probs(m, ds.x_test, batch_size=batch_size) for m in models]  # once, for both uses
    scored = scoring.score(ds, predict, attack, tta=tta, fgsm_images=fgsm_images, seed=seed,
                            probs=voting.combine(member_probs, method, weights))
    member_accuracy = {m.run.info.run_name: float((p.argmax(1) == ds.y_test).mean()) for m, p in zip(members, member_probs)}

    tracking.use_experiment(EXPERIMENT)
    names = "+".join(m.run.info.run_name for m in members)
    first = members[0].run.data.params
    with mlflow.start_run(run_name=f"ensemble-{method}-{names}"[:250]) as run:
        mlflow.set_tags({**tracking.run_tags("ensemble", ds.checksum),
                         "cifarflow.members": ",".join(m.run.info.run_id for m in members)})
        mlflow.log_params({
            "model": "ensemble", "method": method, "weights": str(weights),  # = json.dumps of a float list
            "members": ",".join(m.model_uri for m in members), "member_refs": ",".join(refs)[:6000],
            "data_source": first.get("data_source", first.get("data", "cifar10")),
            **{k: first[k] for k in ("skip_corrupt", "resize", "classes") if k in first},
            "test_images": len(ds.y_test), "tta": tta, "fgsm_images": min(fgsm_images, len(ds.y_test)),
        })
        scoring.log_scored(scored, ds)
        for i, acc in enumerate(member_accuracy.values()):
            mlflow.log_metric("member_test_accuracy", acc, step=i)
        totals = {k: sum(m.run.data.metrics.get(k, 0.0) for m in members)
                  for k in ("param_count", "trainable_param_count", "train_seconds")}
        mlflow.log_metrics(totals)
        info = log_pyfunc(models, method, weights, ds.class_names)
        mlflow.set_tag("cifarflow.model_uri", info.model_uri)
    return EnsembleResult(run.info.run_id, info.model_uri, {**scored.metrics, **totals}, member_accuracy)
