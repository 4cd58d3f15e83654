"""The training plan of transfer models (:mod:`cifarflow.models.transfer`): head then fine-tune, or a source task.

Everything the trainer does differently for a pretrained backbone lives here, as a
:class:`~cifarflow.training.phases.TrainingPlan` the trainer runs like any other:
the phases (``head``: backbone frozen; ``fine_tune``: top of the backbone unfrozen,
BatchNorm kept frozen unless ``fine_tune_batchnorm``; ``source``: every layer trainable), the tags naming the initial
backbone weights, BatchNorm calibration before the first phase, and the backbone's
weights logged after a source task.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import mlflow

from cifarflow.config import TrainConfig
from cifarflow.models import transfer
from cifarflow.training.phases import Phase, TrainingPlan
from cifarflow.utils import sha256_file


def _freeze_backbone(model: keras.Model) -> dict[str, int]:
    transfer.freeze_backbone(model)
    return {"frozen_layers": len(transfer.backbone_of(model).layers) - 1, "unfrozen_layers": 0}


def _unfreeze_top(config: TrainConfig):
    def prepare(model: keras.Model) -> dict[str, int]:
        frozen, unfrozen = transfer.unfreeze_top(model, config.fine_tune_fraction, config.fine_tune_layers,
                                                 batchnorm=config.fine_tune_batchnorm)
        return {"frozen_layers": frozen, "unfrozen_layers": unfrozen}

    return prepare


def _unfreeze_all(model: keras.Model) -> dict[str, int]:
    transfer.unfreeze_all(model)
    return {}


class TransferPlan(TrainingPlan):
    """Phases and hooks of a transfer recipe.

    Two-phase recipes (``head_epochs`` and ``fine_tune_epochs`` set): ``head``
    (the recipe's optimizer, learning rate and schedule over ``head_epochs``),
    then ``fine_tune`` (SGD with the recipe's momentum/nesterov/weight decay,
    cosine decay from ``fine_tune_learning_rate`` to 0 over ``fine_tune_epochs``,
    no warmup); phases of 0 epochs are left out. ``source_task``: one phase
    ``source`` of ``epochs``, every layer trainable, then the backbone's weights
    are logged. Otherwise one phase ``train``, the model as built.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        if config.source_task:
            phases = [Phase("source", config.epochs, config, _unfreeze_all)]
        elif config.two_phase:
            head = config.model_copy(update={"epochs": config.head_epochs})
            tune = config.model_copy(update={
                "epochs": config.fine_tune_epochs, "optimizer": config.fine_tune_optimizer,
                "learning_rate": config.fine_tune_learning_rate,
                "schedule": "cosine", "warmup_epochs": 0.0, "min_learning_rate": 0.0,
            })
            phases = [p for p in (Phase("head", config.head_epochs, head, _freeze_backbone),
                                  Phase("fine_tune", config.fine_tune_epochs, tune, _unfreeze_top(tune))) if p.epochs]
        else:
            phases = [Phase("train", config.epochs, config)]
        super().__init__(phases)

    def tags(self, model: keras.Model) -> dict[str, str]:
        """``cifarflow.weights_source``, ``cifarflow.weights_sha256`` (and for EfficientNet-Lite ImageNet weights
        ``cifarflow.weights_file``), see :func:`cifarflow.models.transfer.weights_tags`."""
        return transfer.weights_tags(self.config.model_params["weights"], model)

    def before_fit(self, model: keras.Model, train_ds) -> None:
        """With ``calibrate_batchnorm`` > 0: re-estimate the backbone's BatchNorm statistics on that many
        training batches (metric ``calibration_batches``)."""
        if self.config.calibrate_batchnorm:
            used = transfer.calibrate_batchnorm(model, train_ds.take(self.config.calibrate_batchnorm))
            mlflow.log_metric("calibration_batches", used)

    def after_fit(self, model: keras.Model, run_id: str) -> None:
        """Source task: log the backbone's weights as ``backbone.weights.h5`` (tag ``cifarflow.backbone_weights``
        holds its ``runs:/`` URI, usable as ``weights=`` of a target run)."""
        if not self.config.source_task:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "backbone.weights.h5"
            transfer.backbone_of(model).save_weights(str(path))
            mlflow.log_artifact(str(path))
            mlflow.set_tags({"cifarflow.backbone_weights": f"runs:/{run_id}/backbone.weights.h5",
                             "cifarflow.backbone_weights_sha256": sha256_file(path)})
