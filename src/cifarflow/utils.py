"""Small helpers every layer may import (nothing from cifarflow): YAML scalar parsing, file hashing."""

from __future__ import annotations

import hashlib
import os
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
