"""Small helpers every layer may import (nothing from cifarflow): YAML scalar parsing, file hashing, the Keras cache
folder, the recipe folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import yaml


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (``0.1`` -> float, ``true`` -> bool, ``null`` -> None)."""
    try:
        return yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError:
        return text


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def keras_models_dir() -> Path:
    """Where Keras caches downloaded application weights: ``<KERAS_HOME or ~/.keras>/models``."""
    try:
        from keras.src.backend.config import keras_home  # what keras.utils.get_file uses

        home = keras_home()
    except ImportError:
        home = os.environ.get("KERAS_HOME", Path.home() / ".keras")
    return Path(home).expanduser() / "models"


def recipes_dir() -> Path:
    """The folder of recipe files: ``$CIFARFLOW_RECIPES``, else ``experiments/``
    of the working directory, else the one of the source checkout."""
    env = os.environ.get("CIFARFLOW_RECIPES")
    if env:
        return Path(env)
    local = Path.cwd() / "experiments"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[2] / "experiments"


def available_recipes() -> list[str]:
    """Names of the recipe files in :func:`recipes_dir`."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))
