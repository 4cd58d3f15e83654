"""cifarflow: MLflow-tracked CIFAR-10 experiments, tuning, registry and export.

The Python API (:mod:`cifarflow.api`, imported on first use): :func:`train`,
:func:`tune`, :func:`evaluate`, :func:`compare`, :func:`ensemble`,
:func:`register`, :func:`promote`, :func:`export`, :func:`pull`,
:func:`predict`, :func:`load_model`. See docs/python-api.md.
"""

__version__ = "0.1.0"
__all__ = ["train", "tune", "evaluate", "compare", "ensemble", "register", "promote", "export", "pull", "predict",
           "load_model"]


def __getattr__(name: str):
    """The API functions, imported from :mod:`cifarflow.api` when first asked for (keeps ``import cifarflow`` light)."""
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("cifarflow.api"), name)
    raise AttributeError(f"module 'cifarflow' has no attribute '{name}'")
