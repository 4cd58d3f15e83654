"""Which training plan a recipe's model gets: a family's own plan where it has one, else one phase."""

from __future__ import annotations

from collections.abc import Callable

from cifarflow.config import TrainConfig
from cifarflow.models import transfer
from cifarflow.training.phases import TrainingPlan, single_phase
from cifarflow.training.transfer import TransferPlan

# builder name -> plan factory; a model family with its own phases or hooks adds its builders here
PLANS: dict[str, Callable[[TrainConfig], TrainingPlan]] = {name: TransferPlan for name in transfer.BACKBONES}


def plan(config: TrainConfig) -> TrainingPlan:
    """The training plan of ``config`` (see :mod:`cifarflow.training.phases`)."""
    return PLANS.get(config.model, single_phase)(config)
