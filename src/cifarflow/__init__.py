"""cifarflow: MLflow-tracked CIFAR-10 experiments, tuning, registry and export."""

__version__ = "0.1.0"
