"""TensorFlow vs JAX: training images/s of the same recipes on this machine, as ratios (issue 14).

    python bench/backends.py --data ../shared/data/cifar10-jpeg.tar.gz            # ~6 min, idle 2-core CPU
    python bench/backends.py --data ../shared/data/cifar10-jpeg.tar.gz --quick    # ~3 min
    python bench/backends.py --data TINY_FOLDER --smoke                           # functional check (tests)

For each recipe (``--recipes``, default ``cnn_small,fast``) and each backend, a fresh
process with ``KERAS_BACKEND`` set builds and compiles the model as the trainer does and
measures, after untimed warm-up steps (tracing, XLA compilation):

- ``model``: images/s of ``model.fit`` on one in-memory batch of random pixels repeated (the
  model and optimizer only: the backend's compiler and kernels);
- ``pipeline``: images/s of an epoch of ``model.fit`` on ``--limit`` real training images
  through :func:`cifarflow.training.trainer.training_data` (tf.data on TensorFlow, the array
  pipeline with jit-compiled batch augmentation on JAX), the epoch after a warm-up epoch.

The backends run one after the other, alternating, ``--rounds`` times; the medians are
reported with the ratio JAX / TensorFlow. Both use the recipe's own precision, batch size and
Keras' default compilation per backend (``jit_compile="auto"``: XLA on JAX, TensorFlow's graph
without XLA on TensorFlow). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from run import EpochClock  # noqa: E402
BACKENDS = ("tensorflow", "jax")


def measure(recipe: str, data: str, limit: int, steps: int, warmup: int, batch: int | None) -> dict:
    """(In the worker process) ``{"model": images/s, "pipeline": images/s, "batch_size": int, ...}``."""
    import keras
    import numpy as np

    from cifarflow import config, tracking
    from cifarflow.data import datasets
    from cifarflow.training import trainer

    cfg = config.resolve(recipe, {"data": data} | ({"batch_size": batch} if batch else {}))
    keras.config.set_dtype_policy(cfg.precision)
    trainer.seed_everything(cfg.seed)
    ds = datasets.load(cfg.data)
    idx = np.random.default_rng(0).permutation(len(ds.y_train))[:limit]
    x, y = ds.x_train[idx], ds.y_train[idx]
    model = trainer.build_and_compile(cfg, ds.num_classes, x)

    rng = np.random.default_rng(0)
    xb = rng.integers(0, 256, (cfg.batch_size * (warmup + steps), 32, 32, 3)).astype(np.float32)
    yb = np.eye(ds.num_classes, dtype=np.float32)[rng.integers(0, ds.num_classes, len(xb))]
    model.fit(xb[: cfg.batch_size * warmup], yb[: cfg.batch_size * warmup], batch_size=cfg.batch_size,
              epochs=1, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(xb[cfg.batch_size * warmup:], yb[cfg.batch_size * warmup:], batch_size=cfg.batch_size,
              epochs=1, verbose=0, shuffle=False)
    model_ips = steps * cfg.batch_size / (time.perf_counter() - start)

    train_ds, callbacks = trainer.training_data(cfg, x, y, ds.num_classes)

    clock = EpochClock.make()  # seconds from each epoch's start to the next one's
    model.fit(train_ds, epochs=2, verbose=0, shuffle=False, callbacks=[*callbacks, clock])
    pipeline_ips = len(y) / clock.seconds(1)
    return {"model": model_ips, "pipeline": pipeline_ips, "batch_size": cfg.batch_size,
            "precision": cfg.precision, "backend": keras.backend.backend(),
            "version": next(iter(tracking.backend_version().values()))}


def run_worker(backend: str, recipe: str, args: list[str]) -> dict:
    """Run :func:`measure` in a new process on ``backend``; its JSON result."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, "--worker", recipe, *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise click.ClickException(f"{backend} {recipe} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--data", required=True, help="Data source (the real CIFAR-10 for figures that mean something).")
@click.option("--recipes", default="cnn_small,fast", show_default=True)
@click.option("--limit", type=int, default=None, help="Real training images per pipeline epoch [5120; quick 3072].")
@click.option("--steps", type=int, default=None, help="Timed in-memory steps [6; quick 3].")
@click.option("--rounds", type=int, default=None, help="Alternating rounds per backend [2; quick 1].")
@click.option("--quick", is_flag=True)
@click.option("--smoke", is_flag=True, help="Tiny batches and steps: checks that it runs; figures mean nothing.")
@click.option("--worker", default=None, hidden=True)
def main(data, recipes, limit, steps, rounds, quick, smoke, worker) -> None:
    """Print a Markdown table of images/s per backend and the JAX / TensorFlow ratios."""
    limit = limit or (32 if smoke else 3072 if quick else 5120)
    steps = steps or (1 if smoke else 3 if quick else 6)
    rounds = rounds or (1 if smoke or quick else 2)
    batch = 16 if smoke else None
    if worker:
        result = measure(worker, data, limit, steps, warmup=1 if smoke else 2, batch=batch)
        click.echo(json.dumps(result))
        return
    args = ["--data", data, "--limit", str(limit), "--steps", str(steps)] + (["--smoke"] if smoke else [])
    click.echo("# TensorFlow vs JAX (`bench/backends.py`)")
    click.echo()
    click.echo(f"Load average at start {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {rounds} alternating "
               f"round(s), medians; pipeline epochs of {limit} real images, model steps {steps}.")
    click.echo()
    click.echo("| recipe | batch | precision | TF model img/s | JAX model img/s | JAX/TF model | "
               "TF pipeline img/s | JAX pipeline img/s | JAX/TF pipeline |")
    click.echo("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    versions = {}
    for recipe in [r.strip() for r in recipes.split(",") if r.strip()]:
        got: dict[str, list[dict]] = {b: [] for b in BACKENDS}
        for _ in range(rounds):
            for backend in BACKENDS:
                got[backend].append(run_worker(backend, recipe, args))
        med = {b: {k: statistics.median(r[k] for r in got[b]) for k in ("model", "pipeline")} for b in BACKENDS}
        versions.update({b: got[b][0]["version"] for b in BACKENDS})
        tf, jx, first = med["tensorflow"], med["jax"], got["tensorflow"][0]
        click.echo(f"| {recipe} | {first['batch_size']} | {first['precision']} | {tf['model']:.0f} | "
                   f"{jx['model']:.0f} | {jx['model'] / tf['model']:.2f} | {tf['pipeline']:.0f} | "
                   f"{jx['pipeline']:.0f} | {jx['pipeline'] / tf['pipeline']:.2f} |")
    click.echo()
    click.echo(f"TensorFlow {versions.get('tensorflow', '?')}, JAX {versions.get('jax', '?')}.")


if __name__ == "__main__":
    main()
