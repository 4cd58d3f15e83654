"""Data parallelism on one machine through the Keras backend's own API (recipe setting ``distribution``).

``data_parallel``: every device holds a replica of the weights and computes on an equal slice of each
batch; the gradients are averaged across devices, so a step is the step of one device on the whole
batch. The recipe's ``batch_size`` is the global batch (each device gets ``batch_size / devices``) and
``learning_rate`` is the rate for that global batch: moving a recipe to more devices changes nothing.
(To grow the global batch with the device count, scale ``learning_rate`` linearly with it and keep a
warmup, Goyal et al. 2017, arXiv 1706.02677.) JAX: ``keras.distribution.DataParallel``;
TensorFlow: ``tf.distribute.MirroredStrategy``. ``auto`` (the default) is ``data_parallel`` when
the backend sees more than one accelerator (GPU/TPU) and ``none`` otherwise.

Several processes (machines), JAX only: start the same ``cifarflow train`` command in every process with
Keras' variables ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` (the coordinator's ``host:port`` first),
``KERAS_DISTRIBUTION_NUM_PROCESSES`` and ``KERAS_DISTRIBUTION_PROCESS_ID`` (:func:`join_processes`):
the run is data parallel over the devices of all processes, each process feeds its own slice of every
global batch, and process 0 alone records the run (MLflow, checkpoints). docs/backends.md.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import keras

from cifarflow.config import TrainConfig
from cifarflow.errors import CifarflowError


PROCESS_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                     "KERAS_DISTRIBUTION_PROCESS_ID")
_processes: tuple[int, int] | None = None  # (index, count) once joined


def join_processes() -> tuple[int, int]:
    """Join the multi-process run that Keras' environment variables describe (:data:`PROCESS_VARIABLES`),
    once per process, before any JAX computation; ``(0, 1)`` when they name one process or none.

    JAX: ``keras.distribution.initialize`` (``jax.distributed.initialize``; on CPUs the collectives
    go through Gloo). A process other than 0 then records into a scratch MLflow store and checkpoint
    folder of its own, deleted when it exits: process 0 records the run.

    Returns:
        ``(process index, process count)``.

    Raises:
        CifarflowError: several processes on a backend other than JAX, or a variable missing or not a number.
    """
    global _processes
    if _processes is not None:
        return _processes
    try:
        count = int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES") or 1)
        index = int(os.environ.get("KERAS_DISTRIBUTION_PROCESS_ID") or 0)
    except ValueError:
        raise CifarflowError("KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID must be "
                             "whole numbers", "set them as docs/backends.md shows") from None
    if count <= 1:
        _processes = (0, 1)
        return _processes
    backend = keras.backend.backend()
    if backend != "jax":
        raise CifarflowError(f"a training run over several processes (KERAS_DISTRIBUTION_NUM_PROCESSES={count}) "
                             f"needs the JAX backend, not {backend}",
                             "set KERAS_BACKEND=jax, or see docs/backends.md for TensorFlow's MultiWorkerMirroredStrategy")
    addresses = os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES")
    if not addresses or not 0 <= index < count:
        raise CifarflowError(f"process {index} of {count} without KERAS_DISTRIBUTION_JOB_ADDRESSES or with an id "
                             f"outside 0..{count - 1}", "set KERAS_DISTRIBUTION_JOB_ADDRESSES=host:port (the "
                             "coordinator, process 0) and KERAS_DISTRIBUTION_PROCESS_ID in every process")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes
    keras.distribution.initialize(addresses, count, index)
    if index != 0:
        scratch = tempfile.mkdtemp(prefix=f"cifarflow-process{index}-")
        atexit.register(shutil.rmtree, scratch, True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        os.environ["CIFARFLOW_CHECKPOINTS"] = os.path.join(scratch, "checkpoints")
    _processes = (index, count)
    return _processes


def processes() -> tuple[int, int]:
    """``(index, count)`` of this process in a multi-process run (:func:`join_processes`); ``(0, 1)`` alone."""
    return _processes or (0, 1)


def accelerators() -> list[str]:
    """The GPUs/TPUs the Keras backend sees (names as the backend spells them); empty on a CPU-only machine."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id}" for d in jax.devices() if d.platform != "cpu"]  # every process's
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
        if self.kind == "none":
            return "none"
        count = self.process[1]
        return f"data_parallel:{len(self.devices)}" + (f":processes={count}" if count > 1 else "")

    @property
    def process(self) -> tuple[int, int]:
        """``(index, count)`` of this process; each feeds rows ``index/count`` of every global batch."""
        return processes()

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
            # the array pipeline feeds each process its own slice already (ArrayBatches' shard)
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=self.devices,
                                                                                auto_shard_dataset=False))
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
    index, count = join_processes()
    if count > 1:
        if config.distribution == "none":
            raise CifarflowError(f"distribution=none in a run over {count} processes",
                                 "set distribution=data_parallel (or auto), or start one process")
        devices = all_devices()
        if config.batch_size % len(devices):
            raise CifarflowError(
                f"batch_size {config.batch_size} cannot be split evenly over {len(devices)} devices",
                f"set batch_size to a multiple of {len(devices)} (it is the global batch)")
        return Placement("data_parallel", devices)
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
