"""Data parallelism on one machine through the Keras backend's own API (recipe setting ``distribution``).

``data_parallel``: every device holds a replica of the weights and computes on an equal slice of each
batch; the gradients are averaged across devices, so a step is the step of one device on the whole
batch. The recipe's ``batch_size`` is the global batch (each device gets ``batch_size / devices``) and
``learning_rate`` is the rate for that global batch: moving a recipe to more devices changes nothing.
(To grow the global batch with the device count, scale ``learning_rate`` linearly with it and keep a
warmup, Goyal et al. 2017, arXiv 1706.02677.) JAX: ``keras.distribution.DataParallel``;
TensorFlow: ``tf.distribute.MirroredStrategy``. ``auto`` (the default) is ``data_parallel`` when
the backend sees more than one accelerator (GPU/TPU) and ``none`` otherwise. docs/backends.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import keras

from cifarflow.config import TrainConfig
from cifarflow.errors import CifarflowError


def accelerators() -> list[str]:
    """The GPUs/TPUs the Keras backend sees (names as the backend spells them); empty on a CPU-only machine."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id}" for d in jax.devices() if d.platform != "cpu"]
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")]
    if backend == "torch":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return []


def all_devices() -> list[str]:
    """The accelerators, else the CPU devices (several only when made so: XLA's
    ``--xla_force_host_platform_device_count`` on JAX, logical CPUs on TensorFlow)."""
    found = accelerators()
    if found:
        return found
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [f"cpu:{d.id}" for d in jax.devices("cpu")]
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_logical_devices("CPU")]
    return ["cpu"]


@dataclass
class Placement:
    """Where a run trains: ``kind`` ``none`` (one device) or ``data_parallel`` over ``devices``."""

    kind: str
    devices: list[str] = field(default_factory=list)
    _strategy: object = None

    @property
    def tag(self) -> str:
        """The run tag ``cifarflow.distribution``: ``none`` or ``data_parallel:<devices>``."""
        return "none" if self.kind == "none" else f"data_parallel:{len(self.devices)}"

    @property
    def batch_multiple(self) -> int:
        """Every batch the model sees must hold a multiple of this many images (JAX shards each batch
        evenly: :class:`~cifarflow.data.arrays.ArrayBatches` pads with zero-weight rows); 1 otherwise."""
        return len(self.devices) if self.kind == "data_parallel" and keras.backend.backend() == "jax" else 1

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Build, compile and fit inside: the backend's distribution is in effect (restored afterwards)."""
        if self.kind == "none":
            yield
            return
        if keras.backend.backend() == "jax":
            previous = keras.distribution.distribution()
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=self.devices))
            try:
                yield
            finally:
                keras.distribution.set_distribution(previous)
            return
        import tensorflow as tf

        if self._strategy is None:
            self._strategy = tf.distribute.MirroredStrategy(devices=self.devices)
        with self._strategy.scope():
            yield

    def adapt(self, model: keras.Model) -> keras.Model:
        """``model`` (built in :meth:`scope`) made to train as on one device: on TensorFlow data parallel,
        its BatchNormalization layers compute the global batch's statistics (``synchronized``, an
        all-reduce across replicas), as JAX's sharded batch does by itself; undone by :meth:`single_device`."""
        if self.kind != "none" and keras.backend.backend() == "tensorflow":
            for layer in _batch_norms(model):
                layer.synchronized = True
        return model

    def single_device(self, model: keras.Model, rebuild: Callable[[], keras.Model]) -> keras.Model:
        """The trained model on one device, for scoring and logging (call outside :meth:`scope`).

        On JAX a data-parallel model's weights are arrays spread over the devices, and every batch
        it predicts must split evenly; its weights go into ``rebuild()`` (the same architecture,
        built outside the distribution). Otherwise ``model`` itself."""
        if self.kind == "none":
            return model
        if keras.backend.backend() != "jax":
            for layer in _batch_norms(model):  # a saved model must load on any backend
                layer.synchronized = False
            return model
        single = rebuild()
        single.set_weights([keras.ops.convert_to_numpy(w) for w in model.weights])
        return single


def _batch_norms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


def placement(config: TrainConfig) -> Placement:
    """Resolve ``config.distribution`` on this machine and backend.

    Raises:
        CifarflowError: ``data_parallel`` on a backend without it (PyTorch), or a ``batch_size`` that
            the devices cannot share evenly on JAX.
    """
    backend = keras.backend.backend()
    if config.distribution == "none":
        return Placement("none")
    devices = accelerators() if config.distribution == "auto" else all_devices()
    if config.distribution == "auto" and len(devices) < 2:
        return Placement("none")
    if backend not in ("jax", "tensorflow"):
        raise CifarflowError(f"distribution: data_parallel is not supported on the Keras backend {backend}",
                             "use KERAS_BACKEND=jax or tensorflow, or set distribution=none")
    if len(devices) < 2:
        return Placement("none")
    if backend == "jax" and config.batch_size % len(devices):
        raise CifarflowError(
            f"batch_size {config.batch_size} cannot be split evenly over {len(devices)} devices",
            f"set batch_size to a multiple of {len(devices)} (it is the global batch), or distribution=none")
    return Placement("data_parallel", devices)
