"""Input pipeline: batches of raw pixels with Keras-layer augmentation, shuffling, prefetch.

On the TensorFlow backend tf.data; on the others (JAX, PyTorch) :mod:`cifarflow.data.arrays`, which
never imports TensorFlow. :func:`make_dataset` picks; the augmentation and mixing layers, the
:class:`EpochClock` and the ``(seed, epoch, batch index)`` randomness contract are the same.
"""

from __future__ import annotations

from cifarflow.serving import import_tensorflow_quietly

import_tensorflow_quietly()  # before Keras: TensorFlow's C++ start-up lines stay out of the terminal

import keras
import numpy as np

from cifarflow.config import TrainConfig
from cifarflow.data import arrays

F32 = "float32"  # input-pipeline layers compute in float32 whatever the global dtype policy


def augmentation(config: TrainConfig, seed: int = 42, image_size: int = 32) -> keras.layers.Pipeline | None:
    """Keras preprocessing layers for the training split, or None when all are off.

    Default CIFAR-10 augmentation (He et al. 2016): translate by up to
    ``crop_padding`` pixels with zero fill (``crop_fill="reflect"``: reflected
    borders, Keras' reflect, which repeats the edge pixel) and a random horizontal
    flip (``flip="alternate"``: none here, see :class:`AlternatingFlip`). The shift
    is uniform over [-crop_padding, crop_padding] rounded to whole pixels, so the two
    extreme shifts are half as likely as with padding and a random crop.
    Options: ``rotation`` (fraction of a full turn), ``shift`` (fraction of the
    size, reflected fill), ``zoom`` (fraction), ``brightness`` (fraction of the
    0..255 range), ``contrast`` (factor), RandAugment (Cubuk et al. 2020) with
    ``randaugment_ops`` ops of magnitude ``randaugment_magnitude``. Layers act per
    image on float32 batches of 0..255 pixels, are seeded from ``seed`` and stay
    float32 under a mixed-precision policy. A ``keras.layers.Pipeline`` (unlike
    ``Sequential``) runs inside tf.data whatever the Keras backend.
    """
    L = keras.layers
    steps: list[keras.layers.Layer] = []
    if config.crop_padding:
        f = config.crop_padding / image_size
        steps.append(L.RandomTranslation(f, f, fill_mode=config.crop_fill, interpolation="nearest", seed=seed,
                                         name="pad_crop", dtype=F32))
    if config.flip is True:
        steps.append(L.RandomFlip("horizontal", seed=seed + 1, name="flip", dtype=F32))
    if config.rotation:
        steps.append(L.RandomRotation(config.rotation, fill_mode="reflect", seed=seed + 2, name="rotation", dtype=F32))
    if config.shift:
        steps.append(L.RandomTranslation(config.shift, config.shift, fill_mode="reflect", seed=seed + 3, name="shift", dtype=F32))
    if config.zoom:
        steps.append(L.RandomZoom(config.zoom, fill_mode="reflect", seed=seed + 4, name="zoom", dtype=F32))
    if config.brightness:
        steps.append(L.RandomBrightness(config.brightness, value_range=(0, 255), seed=seed + 5, name="brightness", dtype=F32))
    if config.contrast:
        steps.append(L.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 6, name="contrast", dtype=F32))
    if config.randaugment_ops:
        steps.append(L.RandAugment(value_range=(0, 255), num_ops=config.randaugment_ops,
                                   factor=config.randaugment_magnitude, seed=seed + 7, name="randaugment", dtype=F32))
    return keras.layers.Pipeline(steps, name="augmentation") if steps else None


def _gate(layer, mix_weight, seed):
    """Keep ``mix_weight`` with probability ``layer.probability`` per image, else 1 (no mixing)."""
    if layer.probability >= 1.0:
        return mix_weight
    b = layer.backend
    keep = b.random.uniform(b.shape(mix_weight), seed=seed) < layer.probability
    return b.numpy.where(keep, mix_weight, b.numpy.ones_like(mix_weight))


class MixUp(keras.layers.MixUp):
    """Keras' MixUp (Zhang et al. 2018: per image, lambda ~ Beta(alpha, alpha), mixed with
    a shuffled partner in the batch, labels mixed alike) applied to each image with
    probability ``probability``. Safe in tf.data with any backend."""

    def __init__(self, alpha: float = 0.2, probability: float = 1.0, **kwargs):
        super().__init__(alpha=alpha, **kwargs)
        self.probability = probability

    def get_random_transformation(self, data, training=True, seed=None):
        t = super().get_random_transformation(data, training=training, seed=seed)
        t["mix_weight"] = _gate(self, t["mix_weight"], seed or self._get_seed_generator(self.backend._backend))
        return t

    def get_config(self):
        return {**super().get_config(), "probability": self.probability}


class CutMix(keras.layers.CutMix):
    """Keras' CutMix (Yun et al. 2019: a box of area 1 - lambda, lambda ~ Beta(alpha, alpha),
    pasted from a shuffled partner, labels mixed by area) applied to each image with
    probability ``probability``. Safe in tf.data with any backend."""

    def __init__(self, alpha: float = 1.0, probability: float = 1.0, **kwargs):
        super().__init__(factor=(alpha, alpha), **kwargs)
        self.probability = probability

    def _generate_mix_weight(self, batch_size, seed):
        return _gate(self, super()._generate_mix_weight(batch_size, seed), seed)

    def get_config(self):
        return {**super().get_config(), "probability": self.probability}


def mixing(config: TrainConfig, seed: int = 42) -> list[keras.layers.Layer]:
    """Batch-level mixing layers of the recipe: MixUp (``mixup_alpha``) then CutMix
    (``cutmix_alpha``), each on an image with probability ``mix_prob``, or with
    ``mix_prob / 2`` each when both are on. Empty when both alphas are 0."""
    both = bool(config.mixup_alpha and config.cutmix_alpha)
    p = config.mix_prob / 2 if both else config.mix_prob
    layers = []
    if config.mixup_alpha:
        layers.append(MixUp(config.mixup_alpha, probability=p, seed=seed + 11, name="mixup", dtype=F32))
    if config.cutmix_alpha:
        layers.append(CutMix(config.cutmix_alpha, probability=p, seed=seed + 12, name="cutmix", dtype=F32))
    return layers


class EpochClock(keras.callbacks.Callback):
    """The epoch whose randomness a training pipeline draws, as a ``fit`` callback.

    :func:`make_dataset` makes every training epoch's order, augmentation and mixing a
    function of ``(seed, epoch, batch index)``; the epoch is this clock's when an
    epoch's iteration starts. As a ``fit`` callback it follows ``fit``'s epochs, so a
    run resumed with ``fit(initial_epoch=k)`` sees the batches an uninterrupted run
    sees at epoch ``k``. Without the callback each new iteration of the dataset
    counts as the next epoch (0, 1, 2, ...).

    :attr:`epoch` (int) is the epoch for the array pipeline of the other backends
    (:class:`~cifarflow.data.arrays.ArrayBatches`); tf.data reads a ``tf.Variable``
    (:meth:`variable`), made only there, so the clock itself needs no TensorFlow.
    """

    def __init__(self):
        super().__init__()
        self.epoch = 0
        self._epoch = None  # a tf.Variable, made when a tf.data pipeline first needs it

    def variable(self):
        """The epoch as an int64 ``tf.Variable`` (created on first use; TensorFlow only)."""
        if self._epoch is None:
            import tensorflow as tf

            self._epoch = tf.Variable(self.epoch, dtype=tf.int64, trainable=False, name="pipeline_epoch")
        return self._epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = int(epoch)
        if self._epoch is not None:
            self._epoch.assign(epoch)

    def start_epoch(self):
        """(Inside the tf.data pipeline) the epoch now starting, int64 scalar tensor; the clock then reads one more."""
        import tensorflow as tf

        epoch = self.variable()
        current = epoch.read_value()
        with tf.control_dependencies([current]):
            bump = epoch.assign_add(1)
        with tf.control_dependencies([bump]):
            return tf.identity(current)


class AlternatingFlip(EpochClock):
    """Derandomized horizontal flip ("alternating flip", Jordan 2024, arXiv 2404.00498;
    legacy/airbench94.py L131-147 in KellerJordan/cifar10-airbench).

    :meth:`prepare` mirrors a seeded random half of the training images once; then
    on every odd epoch the input pipeline mirrors all of them (:meth:`__call__`). Each
    image thus alternates between its two orientations from one epoch to the next,
    instead of a coin deciding each epoch. It is also the pipeline's
    :class:`EpochClock` when none is given, so it must be among ``fit``'s callbacks.

    Args:
        seed: seed of the half mirrored once.
    """

    def __init__(self, seed: int = 42):
        super().__init__()
        self.seed = seed

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """``x`` (N, H, W, C) with a seeded random half of the images mirrored (a copy)."""
        mirror = np.random.default_rng(self.seed).random(len(x)) < 0.5
        return np.where(mirror[:, None, None, None], x[:, :, ::-1], x)

    def __call__(self, images, epoch):
        """A tf.data batch (B, H, W, C), mirrored when ``epoch`` (int64 scalar tensor) is odd."""
        import tensorflow as tf

        return tf.cond(epoch % 2 == 1, lambda: tf.reverse(images, axis=[2]), lambda: images)


class _BatchSeeds(keras.random.SeedGenerator):
    """A stateless stand-in for a random layer's ``SeedGenerator`` while a batch's map function is traced:
    draw ``i`` of the layer gets the seed ``fold_in(key, i)``, ``key`` being the batch's and the layer's."""

    def __init__(self, key):  # no state variable: nothing to advance, nothing to race on
        self.key, self.draws = key, 0

    def next(self, ordered=True):
        import tensorflow as tf

        self.draws += 1
        return tf.cast(tf.random.experimental.stateless_fold_in(self.key, self.draws), tf.int64)


def _random_layers(layers) -> list[keras.layers.Layer]:
    """Every layer (nested ones included) in ``layers`` that draws from a ``SeedGenerator``, in a fixed order."""
    found = []
    for top in layers:
        for layer in top._flatten_layers(include_self=True, recursive=True):
            if isinstance(getattr(layer, "generator", None), keras.random.SeedGenerator) and layer not in found:
                found.append(layer)
    return found


def _call_seeded(layers, batch_key, call):
    """``call()`` with every random layer of ``layers`` drawing its seeds from ``batch_key`` (while tracing);
    the layers' own generators are put back afterwards."""
    import tensorflow as tf

    saved = []
    for i, layer in enumerate(_random_layers(layers)):
        key = tf.random.experimental.stateless_fold_in(batch_key, i * 1_000_003 + int(getattr(layer, "seed", 0) or 0))
        seeds = _BatchSeeds(key)
        saved.append((layer, layer.generator, dict(getattr(layer, "_backend_generators", {}))))
        object.__setattr__(layer, "generator", seeds)  # not tracked: no state to save or restore
        object.__setattr__(layer, "_backend_generators", {"tensorflow": seeds})
    try:
        return call()
    finally:
        for layer, generator, backends in saved:
            object.__setattr__(layer, "generator", generator)
            object.__setattr__(layer, "_backend_generators", backends)


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    batch_size: int,
    *,
    training: bool,
    augment: keras.layers.Pipeline | None = None,
    mix: list[keras.layers.Layer] | None = None,
    alternate: AlternatingFlip | None = None,
    seed: int = 42,
    clock: EpochClock | None = None,
    multiple: int = 1,
    shard: tuple[int, int] = (0, 1),
):
    """Batches of ``(pixels, one_hot)`` for ``model.fit`` / ``evaluate``, on the Keras backend in use.

    Training batches are a pure function of ``(seed, epoch, batch index)``: the
    epoch's order is a stateless shuffle keyed by ``(seed, epoch)`` and every random
    draw of ``alternate``, ``augment`` and ``mix`` is keyed by ``(seed, epoch,
    batch index, layer, draw)``, whatever order tf.data runs the batches in. The
    epoch is ``clock``'s (see :class:`EpochClock`; put it among ``fit``'s callbacks),
    so a resumed ``fit(initial_epoch=k)`` sees the batches an uninterrupted run sees
    at epoch ``k``.

    Args:
        x: uint8 images (N, H, W, 3), values 0..255.
        y: int labels (N,).
        num_classes: width of the one-hot labels.
        batch_size: images per batch (the last batch may be smaller).
        training: shuffle every epoch (seeded) and apply ``augment``.
        augment: layers from :func:`augmentation`, applied per batch.
        alternate: an :class:`AlternatingFlip` (training only), applied before
            ``augment``; ``x`` must come from its :meth:`~AlternatingFlip.prepare` and
            it must be among ``fit``'s callbacks (it is the clock when ``clock`` is None).
        mix: layers from :func:`mixing`, applied per batch after ``augment``
            (training only); labels become soft, each row still summing to 1.
        seed: seed of the order and of the augmentation draws.
        clock: the :class:`EpochClock` naming the epoch (training only); None: ``alternate``,
            else a private clock that counts the dataset's iterations.
        multiple: (arrays only) every batch padded to a multiple of this many images with
            zero-weight rows, as ``(images, labels, weights)``: JAX data parallelism shards each
            batch evenly (:attr:`cifarflow.training.distribute.Placement.batch_multiple`).
            tf.data ignores it (``tf.distribute`` splits uneven batches itself).
        shard: (arrays only) ``(process index, process count)`` of a run over several processes:
            each process yields its part of every global batch (:mod:`cifarflow.training.distribute`).

    Returns:
        Batches of float32 ``(b, H, W, 3)`` pixels on the 0..255 scale and float32
        ``(b, num_classes)`` one-hot labels: on TensorFlow a prefetched ``tf.data.Dataset``
        of known cardinality; on the other backends an
        :class:`~cifarflow.data.arrays.ArrayBatches` (a ``keras.utils.PyDataset``, no TensorFlow).
    """
    if keras.backend.backend() != "tensorflow":
        return arrays.ArrayBatches(x, y, num_classes, batch_size, training=training, augment=augment, mix=mix,
                                   alternate=alternate, seed=seed, clock=(clock or alternate) if training else None,
                                   multiple=multiple, shard=shard)
    import tensorflow as tf

    def to_float(images, labels):
        return tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)

    if not training:
        ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32))).batch(batch_size)
        return without_autotuning(ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))

    clock = clock or alternate or EpochClock()
    clock.variable()  # made eagerly, outside tf.data's tracing
    n, images_all, labels_all = len(y), tf.constant(x), tf.constant(y.astype(np.int32))
    seed_key = tf.constant([seed, 0], dtype=tf.int64)

    def epoch_batches(epoch):
        epoch_key = tf.random.experimental.stateless_fold_in(seed_key, epoch)
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=epoch_key)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return batches.map(lambda b, idx: (epoch, b, idx))

    random_layers = ([augment] if augment is not None else []) + list(mix or [])

    def load_batch(epoch, index, idx):
        images, labels = to_float(tf.gather(images_all, idx), tf.gather(labels_all, idx))
        if alternate is not None:
            images = alternate(images, epoch)
        batch_key = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(seed_key + [0, 1], epoch), index)

        def randomize():
            out = images if augment is None else augment(images, training=True)
            batch = {"images": out, "labels": labels}
            for layer in mix or []:
                batch = layer(batch, training=True)
            return batch["images"], batch["labels"]

        return _call_seeded(random_layers, batch_key, randomize) if random_layers else (images, labels)

    ds = tf.data.Dataset.from_tensors(0).map(lambda _: clock.start_epoch()).flat_map(epoch_batches)
    ds = ds.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.apply(tf.data.experimental.assert_cardinality(-(-n // batch_size)))
    return without_autotuning(ds.prefetch(tf.data.AUTOTUNE))


def without_autotuning(ds):
    """``ds`` with tf.data's autotuning thread turned off (``AUTOTUNE`` values then take tf.data's
    fixed defaults; `fast`'s unstalled epochs on this CPU took as long as before, bench/README.md).

    With it on, every epoch (each new iterator) on this 2-core CPU ended only at that thread's
    next wake-up, 10 ms x (2^n - 1) after the epoch began: 4-step epochs of 14.6 s took 20.47 s
    at random, and a 6-step ``fit`` 2.55 s instead of 1.7 s (bench/README.md).

    Args:
        ds: a ``tf.data.Dataset``.

    Returns:
        The same dataset with ``options().autotune.enabled`` False.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def one_batch_repeated(x: np.ndarray, y: np.ndarray, num_classes: int = 10):
    """One batch fed forever, for timing a model's training step alone (``bench/``): no decoding,
    augmentation or copying per step, and no autotuning (:func:`without_autotuning`), which would end
    each ``fit`` at its next wake-up.

    Args:
        x: uint8 or float images (B, H, W, 3), 0..255; fed as float32.
        y: integer labels (B,), 0 <= y < ``num_classes``; fed one-hot, float32 (B, num_classes).
        num_classes: width of the one-hot labels.

    Returns:
        An infinite ``tf.data.Dataset`` of ``(x, one_hot(y))``: pass ``steps_per_epoch`` to ``fit``.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors((tf.constant(x.astype(np.float32)), tf.one_hot(y, num_classes))).repeat()
    return without_autotuning(ds)


def predict(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model.predict(x)`` in batches, on the TensorFlow backend through a tf.data pipeline without
    autotuning (:func:`without_autotuning`), so the call does not wait for autotuning's next wake-up.

    ``model.predict`` on a NumPy array builds its own tf.data pipeline, autotuned: 10,000 CIFAR
    test images through ``cnn_small`` took 5.92 s (median of 6) against 5.27 s this way, with the
    same outputs (bench/predict_overhead.py, bench/README.md). On the other backends it is
    ``model.predict`` itself.

    Args:
        model: a Keras model.
        x: model inputs (N, ...), e.g. float32 images (N, H, W, 3) 0..255.
        batch_size: inputs per forward pass.

    Returns:
        The model's outputs (N, ...) as a NumPy array, in the order of ``x``.
    """
    if keras.backend.backend() != "tensorflow":
        return model.predict(x, batch_size=batch_size, verbose=0)
    import tensorflow as tf

    return model.predict(without_autotuning(tf.data.Dataset.from_tensor_slices(x).batch(batch_size)), verbose=0)
