"""Pipeline overhead: training images/s with the real input pipeline vs pre-augmented tensors.

Both arms train the same compiled model (the ``cnn_small`` recipe unless
``--recipe``) on the same images with the same batch size; arm A uses
``cifarflow.data.pipeline.make_dataset`` exactly as the trainer does (uint8 ->
float, one-hot, shuffle, pad-crop + flip in tf.data, prefetch); arm B feeds
tensors that were augmented once beforehand and cached in memory, so it
measures model math alone. Rounds alternate A and B so machine noise hits
both; the medians and their ratio A/B are printed. The target is >= 0.90.

    python bench/pipeline_overhead.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402


@click.command()
@click.option("--data", default="cifar10", show_default=True, help="Data source (see cifarflow.data.datasets.load).")
@click.option("--recipe", default="cnn_small", show_default=True)
@click.option("--steps", default=60, show_default=True, help="Training steps per timed round.")
@click.option("--rounds", default=5, show_default=True, help="Timed rounds per arm (alternating).")
def main(data: str, recipe: str, steps: int, rounds: int) -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    from cifarflow import config
    from cifarflow.data import datasets as datamod
    from cifarflow.data import pipeline
    from cifarflow.training.trainer import build_and_compile

    cfg = config.resolve(recipe, {"data": data})
    ds = datamod.load(cfg.data)
    n = steps * cfg.batch_size
    x, y = ds.x_train[:n], ds.y_train[:n]
    model = build_and_compile(cfg, ds.num_classes, x)
    augment = pipeline.augmentation(cfg, seed=cfg.seed)

    real = pipeline.make_dataset(x, y, ds.num_classes, cfg.batch_size, training=True, augment=augment, seed=cfg.seed)
    pre_x = np.concatenate([augment(x[i:i + 1024].astype(np.float32), training=True) for i in range(0, n, 1024)])
    pre = (tf.data.Dataset.from_tensor_slices((pre_x, tf.one_hot(y, ds.num_classes)))
           .batch(cfg.batch_size).cache().prefetch(tf.data.AUTOTUNE))
    pre = pipeline.without_autotuning(pre)  # as the real arm (make_dataset)

    def images_per_second(dataset) -> float:
        start = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0, shuffle=False)
        return n / (time.perf_counter() - start)

    images_per_second(real), images_per_second(pre)  # warm-up: tracing, caches
    a, b = [], []
    for _ in range(rounds):
        a.append(images_per_second(real))
        b.append(images_per_second(pre))
    ra, rb = statistics.median(a), statistics.median(b)
    click.echo(f"recipe={recipe} model_params={cfg.model_params} batch={cfg.batch_size} "
               f"steps/round={steps} rounds={rounds} cpus={os.cpu_count()} backend={keras.backend.backend()}")
    click.echo(f"real pipeline : {ra:8.1f} images/s  (rounds: {', '.join(f'{v:.0f}' for v in a)})")
    click.echo(f"pre-augmented : {rb:8.1f} images/s  (rounds: {', '.join(f'{v:.0f}' for v in b)})")
    click.echo(f"ratio real/pre: {ra / rb:.3f}  (target >= 0.90: {'PASS' if ra / rb >= 0.90 else 'FAIL'})")


if __name__ == "__main__":
    main()
