"""Voting of member probabilities (soft/hard) and the MLflow pyfunc model file that serves a voting ensemble.

This file is self-contained (numpy, keras and mlflow, plus :mod:`cifarflow.serving`, the input
checks and the image decoder, which is logged beside it as ``cifarflow_serving.py``): `cifarflow
ensemble` logs it as the model's code ("models from code"), so a registered ensemble loads and serves
where cifarflow itself is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlflow
import mlflow.pyfunc
import numpy as np

try:
    from cifarflow.serving import PREDICT_BATCH, class_names_of, prediction_table
    from cifarflow.serving import model_input as checked_input
except ImportError:  # served from the logged model's code/ folder, without cifarflow installed
    from cifarflow_serving import PREDICT_BATCH, class_names_of, prediction_table
    from cifarflow_serving import model_input as checked_input

METHODS = ("soft", "hard")
TIE_BREAK = 1e-6  # share added to the winner of a tied hard vote, so that argmax finds it


def combine(probs: Sequence[np.ndarray], method: str = "soft", weights: Sequence[float] | None = None) -> np.ndarray:
    """Combine the members' softmax outputs into the ensemble's probabilities.

    Soft voting is the weighted mean of the members' probabilities. Hard
    voting gives each member one (weighted) vote for its top class and
    returns the vote shares; a tie between classes with equal shares goes to
    the tied class with the highest soft-voting probability, which gets
    :data:`TIE_BREAK` more share (rows are renormalized), so ``argmax`` of the
    output is always the ensemble's prediction. (scikit-learn's
    ``VotingClassifier`` breaks hard ties by the lowest class index instead.)

    Args:
        probs: one float array (N, C) per member, rows summing to 1.
        method: ``"soft"`` or ``"hard"``.
        weights: one non-negative weight per member, not all zero (equal
            weights when None); normalized to sum to 1.

    Returns:
        float32 array (N, C), rows summing to 1.

    Raises:
        ValueError: no members, shapes that differ, an unknown method, or bad weights.
    """
    if not len(probs):
        raise ValueError("an ensemble needs at least one member")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probs])  # (M, N, C); raises on unequal shapes
    if stack.ndim != 3:
        raise ValueError(f"member outputs must be (N, C) arrays, got {stack.shape[1:]}")
    w = np.ones(len(stack)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(stack),) or (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
        raise ValueError(f"weights {list(w)} must be {len(stack)} non-negative numbers, not all zero")
    w = w / w.sum()
    soft = np.einsum("m,mnc->nc", w, stack)
    if method == "soft":
        out = soft
    elif method == "hard":
        votes = np.eye(stack.shape[2])[stack.argmax(axis=2)]  # (M, N, C) one-hot top class per member
        out = np.einsum("m,mnc->nc", w, votes)
        tied = np.isclose(out, out.max(axis=1, keepdims=True), rtol=0, atol=1e-9)
        rows = np.flatnonzero(tied.sum(axis=1) > 1)
        out[rows, np.where(tied, soft, -np.inf)[rows].argmax(axis=1)] += TIE_BREAK
    else:
        raise ValueError(f"unknown voting method '{method}' (use soft or hard)")
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


class VotingEnsemble(mlflow.pyfunc.PythonModel):
    """pyfunc model: raw 0..255 pixels (N, 32, 32, 3) in, the members' combined probabilities (N, C)
    float32 out; or a DataFrame column ``image`` of encoded images in, a table of ``label``,
    ``probability`` and one column per class out (:func:`cifarflow.serving.model_input`, the same
    inputs as one logged Keras model).

    Artifacts ``member_0`` ... ``member_<M-1>`` are ``.keras`` files; the
    model config holds ``method``, ``weights`` and ``class_names``.
    """

    def load_context(self, context) -> None:
        import keras

        config = context.model_config or {}
        names = sorted((k for k in context.artifacts if k.startswith("member_")), key=lambda k: int(k.split("_")[1]))
        self.members = [keras.saving.load_model(context.artifacts[k], compile=False) for k in names]
        self.method = config.get("method", "soft")
        self.weights = config.get("weights")
        self.class_names = class_names_of(config, int(self.members[0].output_shape[-1]))

    def predict(self, context, model_input: np.ndarray, params=None):
        """The ensemble's probabilities (N, C) of raw pixels, or the :func:`cifarflow.serving.prediction_table`
        of encoded images (a DataFrame ``model_input``: the ``np.ndarray`` hint is one MLflow validates
        nothing against, and without a hint it warns); input it refuses raises MlflowException
        INVALID_PARAMETER_VALUE (HTTP 400)."""
        x, images = checked_input(model_input)
        probs = combine([m.predict(x, batch_size=PREDICT_BATCH, verbose=0) for m in self.members], self.method,
                        self.weights)
        return prediction_table(probs, self.class_names) if images else probs


if __name__ != "cifarflow.evaluation.voting":  # loaded by MLflow as a logged model's code
    mlflow.models.set_model(VotingEnsemble())
