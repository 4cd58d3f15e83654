"""Recipes: read experiments/<name>.yaml, apply key=value overrides, validate into one typed config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from cifarflow import models
from cifarflow.errors import CifarflowError
from cifarflow.utils import available_recipes, parse_value, recipes_dir  # noqa: F401  (public here too)


class TrainConfig(pydantic.BaseModel):
    """Everything one training run needs, resolved from a recipe and overrides.

    Learning rates are per step of ``batch_size`` images; epochs count passes
    over the training split; augmentation magnitudes follow the Keras
    preprocessing layers' ``factor`` conventions (fractions of the image size,
    of a full turn for ``rotation``, of the 0..255 range for ``brightness``).
    """

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)

    recipe: str
    model: str
    model_params: dict[str, Any] = {}
    description: str = ""

    # data
    data: str = "cifar10"
    val_fraction: float = pydantic.Field(0.1, ge=0.0, lt=1.0)
    limit: int | None = pydantic.Field(None, gt=0)
    skip_corrupt: bool = False
    resize: bool = False
    trust_data: bool = False  # unpickle a pickle layout without restrictions (can run code)
    seed: int = 42
    # keep only these classes (relabelled 0..k-1 in the dataset's order): a list of
    # names, or "animals" / "vehicles" (the CIFAR-10 groups)
    classes: list[str] | Literal["animals", "vehicles"] | None = None

    # optimization
    epochs: int = pydantic.Field(30, ge=1)
    batch_size: int = pydantic.Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    learning_rate: float = pydantic.Field(0.1, gt=0)
    momentum: float = pydantic.Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = pydantic.Field(5e-4, ge=0)
    # cosine: warmup from 0, cosine decay to min_learning_rate; triangular (one-cycle, airbench94):
    # linear from warmup_start_fraction * learning_rate to learning_rate over the warmup, then
    # linear to min_learning_rate at the last step
    schedule: Literal["cosine", "constant", "triangular"] = "cosine"
    warmup_epochs: float = pydantic.Field(0.0, ge=0)
    warmup_fraction: float | None = pydantic.Field(None, ge=0, lt=1)  # of all steps; set, it replaces warmup_epochs
    warmup_start_fraction: float = pydantic.Field(0.0, ge=0, le=1)  # triangular only
    min_learning_rate: float = pydantic.Field(0.0, ge=0)
    label_smoothing: float = pydantic.Field(0.0, ge=0, lt=1)
    # per-variable rules, keyed by a regex searched in the variable's path (e.g. "beta$", "^whiten/bias$"):
    # learning-rate multiplier (decoupled weight decay keeps the base rate), and epochs after which
    # the variable stops training (no gradient step, no decay)
    lr_multipliers: dict[str, float] = {}
    freeze_after_epochs: dict[str, float] = {}
    # lookahead-style EMA (airbench94): every lookahead_steps steps (0: off) the weights are
    # averaged into an EMA with decay lookahead_decay * (step / total steps)^3 and reset to it;
    # the final weights are the EMA
    lookahead_steps: int = pydantic.Field(0, ge=0)
    lookahead_decay: float = pydantic.Field(0.95**5, ge=0, lt=1)
    # data-dependent initialisation of models that have one (the fast net's whitening layer):
    # a seeded random sample of this many training images
    data_init_images: int = pydantic.Field(5000, ge=1)

    # augmentation (applied in the input pipeline, training split only)
    crop_padding: int = pydantic.Field(4, ge=0, lt=32)
    crop_fill: Literal["constant", "reflect"] = "constant"  # what fills the borders a translation uncovers
    # true: random horizontal flip; "alternate": derandomized (airbench94), a fixed random half of the
    # images mirrored, then every image mirrored on odd epochs
    flip: bool | Literal["alternate"] = True
    rotation: float = pydantic.Field(0.0, ge=0, le=0.5)
    shift: float = pydantic.Field(0.0, ge=0, lt=1)
    zoom: float = pydantic.Field(0.0, ge=0, lt=1)
    brightness: float = pydantic.Field(0.0, ge=0, le=1)
    contrast: float = pydantic.Field(0.0, ge=0, le=1)
    randaugment_ops: int = pydantic.Field(0, ge=0)  # 0: off (Cubuk et al. 2020)
    randaugment_magnitude: float = pydantic.Field(0.5, ge=0, le=1)
    # batch-level mixing (soft labels); 0 disables each
    mixup_alpha: float = pydantic.Field(0.0, ge=0)
    cutmix_alpha: float = pydantic.Field(0.0, ge=0, le=1)  # Keras CutMix bounds it to [0, 1]
    mix_prob: float = pydantic.Field(1.0, ge=0, le=1)

    # evaluation and numerics
    tta: Literal["none", "flip", "multiview"] = "none"  # multiview: 6 views (airbench94), see predict_probs
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    # data parallelism over the devices of this machine (batch_size is the global batch; docs/backends.md):
    # auto = data_parallel when more than one GPU/TPU is visible, else none
    distribution: Literal["auto", "none", "data_parallel"] = "auto"

    # two-phase transfer learning (models with a backbone; both None: one phase of `epochs`).
    # Phase 1 trains the head, backbone frozen, with optimizer/learning_rate/schedule for
    # head_epochs; phase 2 unfreezes the top fine_tune_layers (else fine_tune_fraction) of the
    # backbone, BatchNorm kept frozen (unless fine_tune_batchnorm), with fine_tune_optimizer + cosine
    # at fine_tune_learning_rate.
    head_epochs: int | None = pydantic.Field(None, ge=0)
    fine_tune_epochs: int | None = pydantic.Field(None, ge=0)
    fine_tune_fraction: float = pydantic.Field(0.3, ge=0, le=1)  # 0: phase 2 trains the head only
    fine_tune_layers: int | None = pydantic.Field(None, ge=0)
    fine_tune_learning_rate: float = pydantic.Field(0.001, gt=0)
    fine_tune_optimizer: Literal["sgd", "adam", "adamw"] = "sgd"  # with momentum/nesterov/weight_decay
    # phase 2 also trains the BatchNorm layers among the unfrozen ones (batch statistics, moving
    # statistics updated) instead of keeping them in inference mode
    fine_tune_batchnorm: bool = False
    # pretrain the whole network (one phase of `epochs`, BatchNorm training) and log the
    # backbone's weights as the artifact backbone.weights.h5, for weights=PATH elsewhere
    source_task: bool = False
    # before phase 1, re-estimate the backbone's BatchNorm statistics on this many training
    # batches (useful with weights=none: BatchNorm then runs in inference mode); 0: off
    calibrate_batchnorm: int = pydantic.Field(0, ge=0)

    # callbacks
    early_stopping_patience: int | None = pydantic.Field(None, ge=1)
    reduce_lr_patience: int | None = pydantic.Field(None, ge=1)
    reduce_lr_factor: float = pydantic.Field(0.5, gt=0, lt=1)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _phase_epochs(cls, data: Any) -> Any:
        """In a two-phase recipe ``epochs`` is ``head_epochs + fine_tune_epochs`` (set when absent)."""
        if not isinstance(data, dict) or data.get("source_task") is True:
            return data
        head, tune = data.get("head_epochs"), data.get("fine_tune_epochs")
        if head is None or tune is None:
            return data
        try:
            total = int(float(head)) + int(float(tune))
        except (TypeError, ValueError):
            return data  # the field validators report the bad value
        if data.get("epochs") is None:
            return {**data, "epochs": total}
        if str(data["epochs"]) not in (str(total), f"{total}.0"):
            raise ValueError(f"epochs={data['epochs']} is not head_epochs + fine_tune_epochs = {head} + {tune} "
                             "in a two-phase recipe (set head_epochs and fine_tune_epochs instead)")
        return data

    @property
    def two_phase(self) -> bool:
        """Head-then-fine-tune training (a transfer recipe that is not a source task)."""
        return self.head_epochs is not None and not self.source_task

    @pydantic.model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if (self.head_epochs is None) != (self.fine_tune_epochs is None):
            raise ValueError("set both head_epochs and fine_tune_epochs (or neither)")
        if (self.head_epochs is not None or self.source_task) and self.model not in models.transfer.BACKBONES:
            raise ValueError(f"head_epochs/fine_tune_epochs/source_task need a transfer model "
                             f"({', '.join(models.transfer.BACKBONES)}), not {self.model}")
        if self.reduce_lr_patience is not None and self.schedule != "constant":
            raise ValueError(
                "reduce_lr_patience needs schedule=constant (a cosine schedule already sets the rate)"
            )
        for pattern in (*self.lr_multipliers, *self.freeze_after_epochs):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad variable pattern {pattern!r} in lr_multipliers/freeze_after_epochs: {exc}") from None
        if self.early_stopping_patience is not None and self.val_fraction == 0:
            raise ValueError("early_stopping_patience needs a validation split (val_fraction > 0)")
        return self

    def params(self) -> dict[str, Any]:
        """Flat ``name -> value`` of every setting, as logged to MLflow."""
        flat = self.model_dump(exclude={"model_params", "description"})
        flat.update(self.model_params)
        return flat

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, in the recipe file's own shape."""
        body = self.model_dump(exclude={"model", "model_params"})
        body["model"] = {"name": self.model, **self.model_params}
        return yaml.safe_dump(body, sort_keys=False)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["key=value", ...]`` into a dict of parsed values.

    Raises:
        CifarflowError: an item without ``=``.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CifarflowError(f"bad override '{item}'", "write it as key=value, e.g. --set epochs=5")
        out[key.strip()] = parse_value(value.strip())
    return out


def load_recipe(name_or_path: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a recipe file (by name from :func:`recipes_dir`, or a path) as a dict, its ``extends:`` resolved.

    A recipe may ``extends: <recipe name or path>`` and state only what differs:
    top-level settings replace the parent's, the ``model:`` mapping is merged key
    by key (the parent's model parameters are dropped when the child names another
    model). The result has no ``extends`` key; ``recipe`` is the file's own name.

    Raises:
        CifarflowError: missing file, invalid YAML, no ``model`` section (after
            inheritance), or recipes that extend each other in a loop.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = recipes_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise CifarflowError(
            f"no recipe '{name_or_path}' ({path} not found)",
            f"use one of: {', '.join(available_recipes()) or '(none found)'}, or a path to a .yaml file",
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CifarflowError(f"invalid YAML in {path}: {exc}".replace("\n", " "), "fix the recipe file") from None
    if not isinstance(raw, dict):
        raise CifarflowError(f"{path} is not a mapping of settings", "see experiments/cnn.yaml")
    parent = raw.pop("extends", None)
    if parent is not None:
        here = str(path.resolve())
        if here in _chain:
            raise CifarflowError(f"recipe {path} extends itself (through {' -> '.join(Path(c).stem for c in _chain)})",
                                 "remove the loop of extends:")
        parent_path = path.parent / str(parent) if str(parent).endswith((".yaml", ".yml")) else str(parent)
        base = load_recipe(str(parent_path), (*_chain, here))
        base.pop("recipe")
        model = raw.get("model") or {}
        if isinstance(model, dict) and model.get("name", base["model"]["name"]) == base["model"]["name"]:
            model = {**base["model"], **model}
        raw = {**base, **raw, "model": model}
    if not isinstance(raw.get("model"), dict) or "name" not in raw["model"]:
        raise CifarflowError(f"{path} has no 'model:' mapping with a 'name'", "see experiments/cnn.yaml")
    raw.setdefault("recipe", path.stem)
    return raw


def split_epochs(total: int, head_epochs: int, fine_tune_epochs: int) -> tuple[int, int]:
    """Split ``total`` epochs of a two-phase recipe into ``(head_epochs, fine_tune_epochs)`` in the recipe's ratio.

    ``head = round(total * head_epochs / (head_epochs + fine_tune_epochs))``, then
    kept at 1 or more when the recipe has a head phase, and at ``total - 1`` or
    less when it has a fine-tune phase and ``total >= 2``; fine-tune gets the rest.
    E.g. 5 + 10 with ``--epochs 2`` -> 1 + 1, ``--epochs 6`` -> 2 + 4, ``--epochs 1`` -> 1 + 0.
    """
    if head_epochs + fine_tune_epochs == 0:
        return 0, total
    head = round(total * head_epochs / (head_epochs + fine_tune_epochs))
    if head_epochs:
        head = max(head, 1)
    if fine_tune_epochs and total >= 2:
        head = min(head, total - 1)
    head = min(head, total)
    return head, total - head


def _phase_split(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """``--epochs N`` on a two-phase recipe: N is the total; the phase not given is what is left of it (both
    absent: :func:`split_epochs`). Both phases and epochs given: left to the check that they add up."""
    if overrides.get("epochs") is None or raw.get("source_task") is True:
        return
    if raw.get("head_epochs") is None or raw.get("fine_tune_epochs") is None:
        return
    try:
        total, head, tune = (int(float(raw[k])) for k in ("epochs", "head_epochs", "fine_tune_epochs"))
    except (TypeError, ValueError):
        return  # the field validators report the bad value
    given = {"head_epochs", "fine_tune_epochs"} & set(overrides)
    if given == {"head_epochs"}:
        raw["fine_tune_epochs"] = total - head
    elif given == {"fine_tune_epochs"}:
        raw["head_epochs"] = total - tune
    elif not given:
        raw["head_epochs"], raw["fine_tune_epochs"] = split_epochs(total, head, tune)


def resolve(recipe: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Resolve a recipe and overrides into a validated :class:`TrainConfig`.

    An override key is a training setting (``epochs``, ``learning_rate``...),
    a model parameter (``width``, ``dropout``...; also ``model.width``); ``None``
    (``null``) sets a setting to None, e.g. ``limit=null`` for all images,
    except ``epochs=null``, which keeps the recipe's epochs (what the ``tune``
    entry point passes unless ``-P epochs=N`` is given).

    Raises:
        CifarflowError: unknown recipe, unknown key, or a bad value.
    """
    raw = load_recipe(recipe)
    model_section = dict(raw.pop("model"))
    model_name = model_section.pop("name")
    model_params = dict(model_section)
    settable = models.parameters(model_name)
    for key, value in (overrides or {}).items():
        bare = key.removeprefix("model.")
        if key == "epochs" and value is None:
            continue  # epochs=null: the recipe's epochs (head_epochs + fine_tune_epochs in a two-phase recipe)
        if key.startswith("model.") or (bare in settable and bare not in TrainConfig.model_fields):
            model_params[bare] = value
        elif key in TrainConfig.model_fields and key not in ("model", "model_params", "recipe"):
            raw[key] = value
        else:
            raise CifarflowError(
                f"unknown parameter '{key}' for recipe '{raw['recipe']}'",
                f"training settings: {', '.join(k for k in TrainConfig.model_fields if k not in ('model', 'model_params', 'recipe', 'description'))}; "
                f"model parameters: {', '.join(settable)}",
            )
    _phase_split(raw, overrides or {})
    params = models.resolve_params(model_name, model_params)
    try:
        return TrainConfig(model=model_name, model_params=params, **raw)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "recipe"
        raise CifarflowError(
            f"bad value for '{where}': {err['msg']}" + (f" (got {err['input']!r})" if where != "recipe" else ""),
            "fix it in the recipe or in --set/-P",
        ) from None
