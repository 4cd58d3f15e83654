"""Training phases: one phase for most recipes; head then fine-tune for transfer recipes.

A phase names what is trainable and which optimizer settings apply; the
trainer runs the phases in order in one MLflow run, the epoch index (the
metrics' step) counting on across phases.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from cifarflow.config import TrainConfig
from cifarflow.models import transfer


@dataclass(frozen=True)
class Phase:
    """One ``fit`` of the trainer.

    Attributes:
        name: ``train`` (a plain recipe), ``source`` (source-task pretraining,
            every layer trainable), ``head`` or ``fine_tune``.
        epochs: epochs of this phase.
        config: the settings :func:`cifarflow.training.trainer.make_optimizer` sees
            (optimizer, learning_rate, schedule, epochs of this phase).
    """

    name: str
    epochs: int
    config: TrainConfig


def plan(config: TrainConfig) -> list[Phase]:
    """The phases of a recipe; phases of 0 epochs are left out.

    Two-phase recipes: ``head`` (the recipe's optimizer, learning rate and
    schedule over ``head_epochs``), then ``fine_tune`` (SGD with the recipe's
    momentum/nesterov/weight decay, cosine decay from ``fine_tune_learning_rate``
    to 0 over ``fine_tune_epochs``, no warmup).
    """
    if not config.two_phase:
        return [Phase("source" if config.source_task else "train", config.epochs, config)]
    head = config.model_copy(update={"epochs": config.head_epochs})
    tune = config.model_copy(update={
        "epochs": config.fine_tune_epochs, "optimizer": "sgd", "learning_rate": config.fine_tune_learning_rate,
        "schedule": "cosine", "warmup_epochs": 0.0, "min_learning_rate": 0.0,
    })
    return [p for p in (Phase("head", config.head_epochs, head), Phase("fine_tune", config.fine_tune_epochs, tune))
            if p.epochs]


def prepare(model: keras.Model, phase: Phase) -> dict[str, int]:
    """Set what ``phase`` trains (before compiling); returns the layer counts to log.

    ``head``: backbone frozen. ``fine_tune``: top ``fine_tune_layers`` (else
    ``fine_tune_fraction``) of the backbone unfrozen, BatchNormalization kept
    frozen (inference mode). ``source``: everything trainable. ``train``: as built.
    """
    if phase.name == "head":
        transfer.freeze_backbone(model)
        base = transfer.backbone_of(model)
        return {"frozen_layers": len(base.layers) - 1, "unfrozen_layers": 0}
    if phase.name == "fine_tune":
        frozen, unfrozen = transfer.unfreeze_top(model, phase.config.fine_tune_fraction, phase.config.fine_tune_layers)
        return {"frozen_layers": frozen, "unfrozen_layers": unfrozen}
    if phase.name == "source":
        transfer.unfreeze_all(model)
    return {}
