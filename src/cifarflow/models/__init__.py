"""Model catalog: maps builder names to pure Keras model builders and validates their parameters."""

from __future__ import annotations

from cifarflow.serving import import_tensorflow_quietly

import_tensorflow_quietly()  # before Keras: TensorFlow's C++ start-up lines stay out of the terminal

import inspect
from typing import Callable

import keras
import numpy as np
import pydantic

from cifarflow.errors import CifarflowError
from cifarflow.models.cnn import build_cnn
from cifarflow.models.fast import build_fast, initialize_from_data as _init_fast
from cifarflow.models.plain import build_simple5, build_vgg10
from cifarflow.models.resnet import build_resnet, build_wrn
from cifarflow.models.transfer import (build_efficientnet_lite0, build_efficientnetb0, build_efficientnetv2b0,
                                       build_mobilenetv2, build_resnet50v2)
from cifarflow.models.vit import build_vit

BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "cnn": build_cnn,
    "simple5": build_simple5,
    "vgg10": build_vgg10,
    "resnet20": build_resnet,
    "wrn": build_wrn,
    "vit": build_vit,
    "mobilenetv2": build_mobilenetv2,
    "efficientnetv2b0": build_efficientnetv2b0,
    "efficientnetb0": build_efficientnetb0,
    "resnet50v2": build_resnet50v2,
    "fast": build_fast,
    "efficientnet_lite0": build_efficientnet_lite0,
}
# Data-dependent initialisation after building: builder name -> f(model, sample raw pixels (N, 32, 32, 3)).
DATA_INIT: dict[str, Callable[[keras.Model, np.ndarray], None]] = {"fast": _init_fast}
# Arguments the trainer supplies from the data, never from a recipe.
DATA_ARGUMENTS = ("num_classes", "mean", "std")


def builder(name: str) -> Callable[..., keras.Model]:
    """The builder registered under ``name``.

    Raises:
        CifarflowError: unknown model name.
    """
    try:
        return BUILDERS[name]
    except KeyError:
        raise CifarflowError(
            f"unknown model '{name}'", f"use one of: {', '.join(sorted(BUILDERS))}"
        ) from None


def parameters(name: str) -> dict[str, inspect.Parameter]:
    """The recipe-settable parameters of a builder, by name (data arguments excluded)."""
    sig = inspect.signature(builder(name), eval_str=True)
    return {k: p for k, p in sig.parameters.items() if k not in DATA_ARGUMENTS}


def resolve_params(name: str, params: dict) -> dict:
    """Validate and type-coerce builder parameters, filling in the defaults.

    Args:
        name: builder name.
        params: parameter values from the recipe and overrides.

    Returns:
        Every recipe-settable parameter of the builder with its typed value.

    Raises:
        CifarflowError: unknown parameter or a value of the wrong type.
    """
    known = parameters(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise CifarflowError(
            f"unknown parameter(s) {unknown} for model '{name}'",
            f"the model takes: {', '.join(known)}",
        )
    fields = {
        k: (p.annotation, ... if p.default is inspect.Parameter.empty else p.default)
        for k, p in known.items()
    }
    schema = pydantic.create_model(f"{name}_params", __config__=pydantic.ConfigDict(strict=False), **fields)
    try:
        return schema(**params).model_dump()
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        raise CifarflowError(
            f"bad value for model parameter '{err['loc'][0]}': {err['msg']} (got {err.get('input')!r})",
            "fix it in the recipe or in --set/-P",
        ) from None


def build(name: str, *, num_classes: int, mean=None, std=None, **params) -> keras.Model:
    """Build a registered model (raw 0..255 pixels in, softmax probabilities out).

    Args:
        name: builder name, e.g. ``"cnn"``.
        num_classes: number of output classes.
        mean, std: per-channel statistics of the training pixels on the 0..255
            scale, for the normalization layer inside the model; passed only to
            builders that take them (transfer models apply their backbone's own
            preprocessing instead).
        **params: builder parameters (validated by :func:`resolve_params`).

    Raises:
        CifarflowError: unknown model name or parameter, bad value, or a
            combination the builder refuses.
    """
    typed = resolve_params(name, params)
    try:
        make = builder(name)
        data = {k: v for k, v in (("mean", mean), ("std", std)) if k in inspect.signature(make).parameters}
        return make(num_classes=num_classes, **data, **typed)
    except ValueError as exc:  # a builder's own shape checks, e.g. ResNet depth 6n+2
        raise CifarflowError(f"cannot build '{name}': {exc}", "fix the model parameters in the recipe or --set/-P") from None


def initialize(name: str, model: keras.Model, x_sample) -> bool:
    """Run the data-dependent initialisation of builder ``name`` (if it has one) on ``model``.

    Args:
        name: builder name.
        model: a model that builder made.
        x_sample: uint8 or float raw pixels (N, 32, 32, 3), a random sample of the
            training images (e.g. the fast net's whitening layer: 5,000 images).

    Returns:
        True when the builder has one and it ran.
    """
    init = DATA_INIT.get(name)
    if init is None:
        return False
    init(model, x_sample)
    return True
