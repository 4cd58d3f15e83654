"""Training throughput of any recipe on this machine, and the projected time of its full schedule.

Trains the recipe's model through the real input pipeline (augmentation and
mixing included) for ``--steps`` steps after ``--warmup`` untimed steps and
prints images/s, seconds per epoch of ``--epoch-images`` images and the
projected wall time of the recipe's ``epochs`` (validation excluded).

    python bench/throughput.py wrn --data ../shared/data/cifar10-jpeg.tar.gz --steps 20
    python bench/throughput.py wrn --set depth=16 --set width=4 --steps 50
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402


@click.command()
@click.argument("recipe")
@click.option("--data", default="cifar10", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Recipe overrides.")
@click.option("--steps", default=20, show_default=True, help="Timed training steps.")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first (tracing, caches).")
@click.option("--epoch-images", default=45000, show_default=True, help="Images per epoch for the projection.")
def main(recipe, data, sets, steps, warmup, epoch_images) -> None:
    import keras

    from cifarflow import config
    from cifarflow.data import datasets as datamod
    from cifarflow.data import pipeline
    from cifarflow.training.trainer import build_and_compile, seed_everything

    cfg = config.resolve(recipe, {**config.parse_overrides(sets), "data": data})
    seed_everything(cfg.seed)
    keras.config.set_dtype_policy(cfg.precision)
    ds = datamod.load(cfg.data)
    n = (steps + warmup) * cfg.batch_size
    x, y = ds.x_train[:n], ds.y_train[:n]
    model = build_and_compile(cfg, ds.num_classes, x)
    batches = pipeline.make_dataset(x, y, ds.num_classes, cfg.batch_size, training=True, seed=cfg.seed,
                                     augment=pipeline.augmentation(cfg), mix=pipeline.mixing(cfg))
    model.fit(batches.take(warmup), epochs=1, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(batches.skip(warmup).take(steps), epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - start
    ips = steps * cfg.batch_size / seconds
    epoch = epoch_images / ips
    click.echo(f"recipe={recipe} model={cfg.model} {cfg.model_params} params={model.count_params():,} "
               f"batch={cfg.batch_size} precision={cfg.precision} backend={keras.backend.backend()} "
               f"cpus={os.cpu_count()}")
    click.echo(f"timed {steps} steps ({steps * cfg.batch_size} images) in {seconds:.1f} s: {ips:.1f} images/s")
    click.echo(f"epoch of {epoch_images} images: {epoch / 60:.1f} min; {cfg.epochs} epochs: "
               f"{cfg.epochs * epoch / 3600:.1f} h ({cfg.epochs * epoch / 86400:.2f} days)")


if __name__ == "__main__":
    main()
