"""Training plans: the phases a run fits and the hooks around them, whatever the model.

A plan is a list of phases plus three hooks. The trainer runs every plan the same
way: :meth:`TrainingPlan.tags` once the model is built, :meth:`TrainingPlan.before_fit`,
then each phase (``phase.prepare(model)``, compile with ``phase.config``, fit; the
epoch index, the metrics' step, counting on across phases), the best weights restored,
then :meth:`TrainingPlan.after_fit`. Most recipes have the default plan, one phase
``train`` of the recipe's epochs; a model family may have its own (transfer models:
:mod:`cifarflow.training.transfer`), looked up by :func:`cifarflow.training.plans.plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras

from cifarflow.config import TrainConfig


@dataclass(frozen=True)
class Phase:
    """One ``fit`` of the trainer.

    Attributes:
        name: ``train`` for a one-phase plan; a family's own names otherwise
            (e.g. ``head``, ``fine_tune``, ``source``), logged as tag ``cifarflow.phase``.
        epochs: epochs of this phase.
        config: the settings :func:`cifarflow.training.trainer.make_optimizer` sees
            (optimizer, learning_rate, schedule, epochs of this phase).
        prepare: sets what is trainable before the phase is compiled; returns
            layer counts to log as metrics at the phase's first epoch (may be empty).
    """

    name: str
    epochs: int
    config: TrainConfig
    prepare: Callable[[keras.Model], dict[str, int]] = field(default=lambda model: {}, compare=False)


@dataclass
class TrainingPlan:
    """The phases of a run; the hooks do nothing in this default plan."""

    phases: list[Phase]

    def tags(self, model: keras.Model) -> dict[str, str]:
        """Run tags known once the model is built (before training)."""
        return {}

    def before_fit(self, model: keras.Model, train_ds) -> None:
        """Called in the run before the first phase, with the training batches
        (:func:`cifarflow.data.pipeline.make_dataset`: a ``tf.data.Dataset`` or an ``ArrayBatches``,
        both with ``take(n)``)."""

    def after_fit(self, model: keras.Model, run_id: str) -> None:
        """Called in the run after the last phase, once the best weights are restored, before scoring."""


def single_phase(config: TrainConfig) -> TrainingPlan:
    """The default plan: one phase ``train`` of ``config.epochs``, the model trained as built."""
    return TrainingPlan([Phase("train", config.epochs, config)])
