"""Input pipeline of the Keras backends other than TensorFlow (JAX, PyTorch): NumPy arrays batched by a
``keras.utils.PyDataset``, the recipe's augmentation and mixing applied per batch (jit-compiled on JAX).

No TensorFlow: the same Keras preprocessing layers as the tf.data pipeline
(:func:`cifarflow.data.pipeline.augmentation`, :func:`~cifarflow.data.pipeline.mixing`) run on the
backend's own arrays. Every training batch is a pure function of ``(seed, epoch, batch index)``: the
epoch's order is a permutation seeded by ``(seed, epoch)`` and each batch's augmentation draws from
seeds derived from ``(seed, epoch, index)`` (the layers' seed generators are fed in a
``keras.StatelessScope``), so a resumed run sees the batches an uninterrupted one would have seen,
whatever order or thread fetches them.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np

F32 = "float32"


def _seed_states(layers) -> list:
    """The state variables of every seed generator in ``layers`` and their sub-layers, each once, in order."""
    states: list = []
    for top in layers:
        for layer in top._flatten_layers(include_self=True, recursive=True):
            for generator in getattr(layer, "_seed_generators", ()):
                if all(generator.state is not s for s in states):
                    states.append(generator.state)
    return states


def batch_seeds(seed: int, epoch: int, index: int, count: int) -> np.ndarray:
    """``count`` Keras seed-generator states (``(count, 2)`` uint32) for batch ``index`` of ``epoch``.

    A pure function of its arguments (NumPy's ``SeedSequence`` of ``(seed, epoch, index)``): the draws of
    a batch do not depend on which batches were drawn before it.
    """
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(2 * max(count, 1), dtype=np.uint32)
    return words[: 2 * count].reshape(count, 2)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a permutation of ``range(n)`` (int64) seeded by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchAugmenter:
    """Applies augmentation layers then mixing layers to one batch, statelessly.

    The layers' seed generators take their states from the ``seeds`` argument (a
    ``keras.StatelessScope``), so the result is a function of the batch and its seeds only.
    On JAX the whole transform is one ``jax.jit`` function; batches smaller than
    ``batch_size`` (an epoch's last) are padded by repeating their own images and cut
    back afterwards, so it compiles once.

    Args:
        augment: per-image layers (:func:`cifarflow.data.pipeline.augmentation`) or None.
        mix: batch-level layers (:func:`cifarflow.data.pipeline.mixing`), may be empty.
        batch_size: the full batch size (the compiled shape).
    """

    def __init__(self, augment: keras.layers.Layer | None, mix: list[keras.layers.Layer], batch_size: int):
        self.augment, self.mix, self.batch_size = augment, list(mix), batch_size
        self.states = _seed_states(([augment] if augment is not None else []) + self.mix)
        self._apply = self._transform
        if keras.backend.backend() == "jax":
            import jax

            self._apply = jax.jit(self._transform)

    def _transform(self, images, labels, seeds):
        mapping = [(state, keras.ops.cast(seeds[i], state.dtype)) for i, state in enumerate(self.states)]
        with keras.StatelessScope(state_mapping=mapping):
            if self.augment is not None:
                images = self.augment(images, training=True)
            batch = {"images": images, "labels": labels}
            for layer in self.mix:
                batch = layer(batch, training=True)
        return batch["images"], batch["labels"]

    def __call__(self, images: np.ndarray, labels: np.ndarray, seeds: np.ndarray):
        """Augmented ``images`` (b, H, W, 3) float32 0..255 and mixed ``labels`` (b, C) float32 (backend arrays).

        Args:
            images: float32 (b, H, W, 3), ``b <= batch_size``.
            labels: float32 one-hot (b, C).
            seeds: ``(len(self.states), 2)`` uint32 from :func:`batch_seeds`.
        """
        n = len(images)
        if n < self.batch_size:
            fill = np.arange(self.batch_size) % n
            images, labels = images[fill], labels[fill]
        with warnings.catch_warnings():  # traced once: jnp.arange(dtype=int64) in Keras' layers without x64
            warnings.filterwarnings("ignore", message="Explicitly requested dtype int64")
            out_images, out_labels = self._apply(images, labels, seeds)
        return out_images[:n], out_labels[:n]


def pad_to_multiple(images, labels, multiple: int):
    """``(images, labels, weights)`` with rows repeated at the end up to a multiple of ``multiple`` rows,
    weighted 0 (the batch's own rows 1, float32): a batch that splits evenly over ``multiple`` devices.

    Keras weights losses and metrics by ``weights``, so accuracy counts the batch's own rows only; its
    loss is divided by the padded size (``sum_over_batch_size``), so a padded batch (an epoch's last)
    steps ``n / padded`` as far, at most ``multiple - 1`` rows' worth."""
    n = len(images)
    weights = np.ones(n, np.float32)
    extra = -n % multiple
    if extra:
        rows = np.arange(n + extra) % n
        images, labels = images[rows], labels[rows]
        weights = np.concatenate([weights, np.zeros(extra, np.float32)])
    return images, labels, weights


class _Counter:
    """The epoch of an :class:`ArrayBatches` without a clock: counts the finished passes."""

    epoch = 0


class ArrayBatches(keras.utils.PyDataset):
    """Batches of ``(pixels, one_hot)`` from in-memory arrays for ``model.fit`` / ``evaluate``.

    Training batches follow :func:`epoch_order` and are flipped (``alternate``, odd epochs),
    augmented and mixed by a :class:`BatchAugmenter` seeded with :func:`batch_seeds`; the
    epoch is ``clock.epoch`` (a :class:`cifarflow.data.pipeline.EpochClock` among ``fit``'s
    callbacks), or without a clock the number of passes finished. Evaluation
    batches are the images in order, unchanged. Batches are made in the training loop's
    thread (``workers=1``): Keras' threaded prefetch replays batches fetched before an epoch
    starts (the model build draws one), which would break ``(seed, epoch, index)`` order.
    With ``multiple`` > 1 (data parallelism on JAX) every batch is ``(images, labels, weights)``,
    padded by :func:`pad_to_multiple`; with ``shard=(i, n)`` (a run over ``n`` processes) only the
    ``i``-th of ``n`` equal parts of that global batch, which Keras assembles across the processes.

    Args: see :func:`cifarflow.data.pipeline.make_dataset`.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int, batch_size: int, *, training: bool,
                 augment: keras.layers.Layer | None = None, mix: list[keras.layers.Layer] | None = None,
                 alternate=None, seed: int = 42, clock=None, multiple: int = 1, shard: tuple[int, int] = (0, 1)):
        super().__init__(workers=1, use_multiprocessing=False)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y = x, np.asarray(y, dtype=np.int64)
        self.num_classes, self.batch_size, self.training, self.seed = num_classes, batch_size, training, seed
        self.multiple, self.shard = multiple, shard
        if shard[1] > 1 and multiple % shard[1]:
            raise ValueError(f"multiple {multiple} is not a multiple of the {shard[1]} processes")
        self.alternate = alternate is not None and training
        self.clock = clock if clock is not None else _Counter()
        self._counting = clock is None
        self._order: tuple[int, np.ndarray] | None = None
        wanted = training and (augment is not None or bool(mix))
        self.augmenter = BatchAugmenter(augment, mix or [], batch_size) if wanted else None

    @property
    def epoch(self) -> int:
        """The epoch whose batches this yields (the clock's)."""
        return self.clock.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.clock.epoch = int(value)

    def on_epoch_end(self) -> None:
        """(Keras, after each pass) without a clock, the next pass is the next epoch."""
        if self._counting and self.training:
            self.clock.epoch += 1

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def _indices(self, index: int):
        window = slice(index * self.batch_size, (index + 1) * self.batch_size)
        if not self.training:
            return window
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(self.seed, self.epoch, len(self.y)))
        return self._order[1][window]

    def __getitem__(self, index: int):
        """Batch ``index`` of the current epoch: float32 (b, H, W, 3) pixels 0..255, float32 (b, C) labels."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        rows = self._indices(index)
        images = self.x[rows]
        if self.alternate and self.epoch % 2 == 1:
            images = images[:, :, ::-1]
        images = images.astype(np.float32)
        labels = np.eye(self.num_classes, dtype=np.float32)[self.y[rows]]
        if self.augmenter is not None:
            seeds = batch_seeds(self.seed, self.epoch, index, len(self.augmenter.states))
            images, labels = self.augmenter(images, labels, seeds)
        if self.multiple > 1:
            images, labels, weights = pad_to_multiple(images, labels, self.multiple)
            index, count = self.shard
            if count > 1:  # this process's rows of the global batch (every process makes the same batch)
                rows = slice(index * len(weights) // count, (index + 1) * len(weights) // count)
                return images[rows], labels[rows], weights[rows]
            return images, labels, weights
        return images, labels

    def take(self, count: int):
        """The first ``count`` batches of the current epoch (as ``tf.data.Dataset.take``), an iterator."""
        return (self[i] for i in range(min(count, len(self))))

    def as_numpy_iterator(self):
        """The current epoch's batches as NumPy ``(images, labels)`` pairs (as ``tf.data.Dataset``'s)."""
        return (tuple(np.asarray(a) for a in batch) for batch in (self[i] for i in range(len(self))))
