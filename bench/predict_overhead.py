"""Scoring: ``model.predict`` on a NumPy array (Keras' own tf.data pipeline, autotuned) vs
``cifarflow.data.pipeline.predict`` (a tf.data pipeline with autotuning off), same model, same images.

Both arms score the same test images with the recipe's model (untrained: the speed does not depend
on the weights) at the same batch size. Rounds alternate the arms so machine noise hits both; the
medians, their ratio and the largest output difference (must be 0) are printed. The ratio
numpy/cifarflow above 1 is the time the autotuned pipeline waits for its thread's next wake-up.

    python bench/predict_overhead.py --data ../shared/data/cifar10-jpeg.tar.gz
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
@click.option("--images", default=10_000, show_default=True, help="Test images scored per round.")
@click.option("--rounds", default=6, show_default=True, help="Timed rounds per arm (alternating).")
@click.option("--batch-size", default=256, show_default=True)
def main(data: str, recipe: str, images: int, rounds: int, batch_size: int) -> None:
    import keras
    import numpy as np

    from cifarflow import config
    from cifarflow.data import datasets as datamod
    from cifarflow.data import pipeline
    from cifarflow.training.trainer import build_and_compile

    cfg = config.resolve(recipe, {"data": data})
    ds = datamod.load(cfg.data)
    x = ds.x_test[:images].astype(np.float32)
    model = build_and_compile(cfg, ds.num_classes, ds.x_train[:256])

    arms = {"numpy (Keras' pipeline)": lambda: model.predict(x, batch_size=batch_size, verbose=0),
            "cifarflow predict": lambda: pipeline.predict(model, x, batch_size)}
    outputs = {name: arm() for name, arm in arms.items()}  # warm-up: tracing
    diff = float(np.abs(np.subtract(*outputs.values())).max())
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, arm in arms.items():
            start = time.perf_counter()
            arm()
            seconds[name].append(time.perf_counter() - start)
    click.echo(f"recipe={recipe} images={len(x)} batch={batch_size} rounds={rounds} cpus={os.cpu_count()} "
               f"backend={keras.backend.backend()} max |output difference|={diff:.1e}")
    for name, values in seconds.items():
        click.echo(f"{name:24s}: median {statistics.median(values):6.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in values)})")
    a, b = (statistics.median(v) for v in seconds.values())
    click.echo(f"ratio numpy/cifarflow: {a / b:.3f}")


if __name__ == "__main__":
    main()
