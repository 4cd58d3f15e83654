"""One benchmark run: every speed figure of issue 12 as a ratio or fraction measured side by side.

    python bench/run.py --data ../shared/data/cifar10-jpeg.tar.gz            # full (hours: trains `fast`)
    python bench/run.py --data ../shared/data/cifar10-jpeg.tar.gz --quick    # under ~15 minutes

Prints, and writes to ``bench/RESULTS.md`` (``--out``) with the machine (from the
system), date, commit, every figure and the MLflow run id behind each accuracy:

1. matmul peak of this CPU (TensorFlow, float32 and bfloat16, GFLOP/s);
2. training images/s of ``fast`` and ``cnn_small`` on in-memory batches under
   float32 vs mixed_bfloat16 and ``jit_compile`` off vs on (speed-ups as ratios),
   and the achieved training GFLOP/s (forward FLOPs per image from the layers x 3
   x images/s) as a fraction of the peak of the same dtype;
3. pipeline overhead: images/s through the real input pipeline over images/s on
   pre-augmented cached tensors (same model, alternating rounds);
4. platform overhead: images/s of an epoch of ``cifarflow train`` (MLflow logging,
   callbacks, checkpoints) over a bare ``model.fit`` of the same model on the same
   pipeline (second epochs, after tracing);
5. export: batch-1 latency of Keras vs ONNX Runtime vs LiteRT, by running
   ``bench/export_latency.py`` on ``--export-model`` when ``cifarflow export`` has
   written its files (skipped otherwise, with the commands to make them);
6. time to accuracy of ``fast``: ``cifarflow train fast`` end to end (the full
   recipe, and the short variant ``--short-epochs``), test accuracy with and
   without TTA, wall time, images/s and the run id.

Run it on an otherwise idle machine: figures from a loaded machine mean little.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import click  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, str]:
    """CPU model, cores, memory and library versions, read from the system."""
    import keras
    import tensorflow as tf

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
                      .split()[1])
        memory = f"{mem_kib / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        memory = "?"
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in info)
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "?"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": memory, "cpu_flags": flags,
            "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "backend": keras.backend.backend(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def matmul_peak(dtype: str, n: int, reps: int) -> float:
    """Best GFLOP/s of an ``n`` x ``n`` matmul in ``dtype`` (2 n^3 FLOPs), TensorFlow graph mode."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    f = tf.function(lambda x: tf.matmul(x, x), autograph=False)
    f(a).numpy()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        f(a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def model_speed(recipe: str, precision: str, jit: bool, steps: int, warmup: int) -> tuple[float, int]:
    """Training images/s of ``recipe``'s compiled model on in-memory random pixels, and its forward FLOPs/image."""
    import keras
    import numpy as np
    import tensorflow as tf

    from cifarflow import config
    from cifarflow.models.flops import flops_per_image
    from cifarflow.training import trainer

    cfg = config.resolve(recipe, {"precision": precision})
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (cfg.batch_size, 32, 32, 3)).astype(np.uint8)
        y = rng.integers(0, 10, cfg.batch_size)
        model = trainer.build_and_compile(cfg, 10, x)
        model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"], jit_compile=jit)
        batch = (tf.constant(x.astype(np.float32)), tf.one_hot(y, 10))
        ds = tf.data.Dataset.from_tensors(batch).repeat()
        model.fit(ds, steps_per_epoch=warmup, epochs=1, verbose=0)
        start = time.perf_counter()
        model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
        return steps * cfg.batch_size / (time.perf_counter() - start), flops_per_image(model)
    finally:
        keras.config.set_dtype_policy(previous)


def pipeline_overhead(recipe: str, data: str, steps: int, rounds: int) -> tuple[float, float]:
    """Median images/s through the real input pipeline and on pre-augmented cached tensors."""
    import numpy as np
    import tensorflow as tf

    from cifarflow import config
    from cifarflow.data import datasets, pipeline
    from cifarflow.training import trainer

    cfg = config.resolve(recipe, {"data": data})
    ds = datasets.load(cfg.data)
    n = steps * cfg.batch_size
    idx = np.random.default_rng(0).permutation(len(ds.y_train))[:n]
    x, y = ds.x_train[idx], ds.y_train[idx]
    model = trainer.build_and_compile(cfg, ds.num_classes, x)
    real, callbacks = trainer.training_data(cfg, x, y, ds.num_classes)
    pre = [(np.asarray(i), np.asarray(l)) for i, l in real.take(steps)]
    cached = tf.data.Dataset.from_tensor_slices((np.concatenate([p[0] for p in pre]),
                                                 np.concatenate([p[1] for p in pre])))
    cached = cached.batch(cfg.batch_size).cache().prefetch(tf.data.AUTOTUNE)

    def ips(dataset) -> float:
        start = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        return n / (time.perf_counter() - start)

    ips(real), ips(cached)
    a, b = [], []
    for _ in range(rounds):
        a.append(ips(real))
        b.append(ips(cached))
    return statistics.median(a), statistics.median(b)


def platform_overhead(recipe: str, data: str, limit: int) -> tuple[float, float, str]:
    """Second-epoch images/s of ``cifarflow train`` (run id returned) and of a bare ``model.fit``."""
    import mlflow
    import numpy as np

    from cifarflow import config
    from cifarflow.data import datasets
    from cifarflow.training import trainer

    cfg = config.resolve(recipe, {"data": data, "limit": limit, "epochs": 2, "tta": "none"})
    result = trainer.train(cfg, quiet=True, run_name=f"bench-platform-{recipe}")
    hist = mlflow.tracking.MlflowClient().get_metric_history(result.run_id, "images_per_second")
    platform_ips = max(hist, key=lambda m: m.step).value

    ds = datasets.load(cfg.data)
    x, y = datasets.limit_per_class(ds.x_train, ds.y_train, cfg.limit, cfg.seed)
    model = trainer.build_and_compile(cfg, ds.num_classes, x)
    train_ds, callbacks = trainer.training_data(cfg, x, y, ds.num_classes)
    times = []

    class Clock(__import__("keras").callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            times.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            times[-1] = time.perf_counter() - times[-1]

    model.fit(train_ds, epochs=2, verbose=0, shuffle=False, callbacks=[Clock(), *callbacks])
    return platform_ips, len(y) / times[-1], result.run_id


def time_to_accuracy(data: str, epochs: int | None, limit: int | None = None) -> dict:
    """``cifarflow train fast`` end to end (``epochs`` overrides the recipe's)."""
    import mlflow

    from cifarflow import config
    from cifarflow.training import trainer

    overrides = {"data": data, "limit": limit} | ({"epochs": epochs} if epochs else {})
    cfg = config.resolve("fast", overrides)
    start = time.perf_counter()
    result = trainer.train(cfg, quiet=True, run_name=f"bench-fast-e{cfg.epochs}")
    wall = time.perf_counter() - start
    m = result.metrics
    images = int(mlflow.tracking.MlflowClient().get_run(result.run_id).data.params["train_images"])
    return {"epochs": cfg.epochs, "wall_seconds": wall, "train_seconds": m["train_seconds"],
            "test_accuracy": m["test_accuracy"], "test_accuracy_tta": m.get("test_accuracy_tta"),
            "images_per_second": images * cfg.epochs / m["train_seconds"], "run_id": result.run_id}


@click.command()
@click.option("--data", default="cifar10", show_default=True, help="Data source (as for cifarflow train).")
@click.option("--quick", is_flag=True,
              help="Fewer steps and rounds; of fast, only a 2-epoch run (< ~15 min on an idle 2-core CPU).")
@click.option("--short-epochs", default=4, show_default=True, help="Epochs of the short fast variant.")
@click.option("--export-model", default="cifarflow-cnn@champion", show_default=True,
              help="Registered version whose exported files export_latency.py times.")
@click.option("--steps", type=int, default=None, help="Timed steps per speed measurement (default: 4 quick, 15 full).")
@click.option("--limit", type=int, default=None,
              help="Training images for the fast runs (a functional check; figures are then not comparable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=REPO / "bench" / "RESULTS.md",
              show_default=True)
def main(data: str, quick: bool, short_epochs: int, export_model: str, steps: int | None, limit: int | None,
         out: Path) -> None:
    lines: list[str] = []

    def say(text: str = "") -> None:
        click.echo(text)
        lines.append(text)

    info = machine()
    say("# Benchmark results (`bench/run.py" + (" --quick" if quick else "") + "`)")
    say()
    say(f"{info['date']}, commit `{info['commit']}`. Machine: {info['cpu']}, {info['cores']} cores, "
        f"{info['memory']}, flags {info['cpu_flags'] or '-'}; load average at start {info['load_average']}. "
        f"Python {info['python']}, TensorFlow {info['tensorflow']}, Keras {info['keras']} ({info['backend']}).")
    say()

    n = 2048 if quick else 4096
    peak = {"float32": matmul_peak("float32", n, 3 if quick else 10),
            "mixed_bfloat16": matmul_peak("bfloat16", n, 3 if quick else 10)}
    say("## Matmul peak (TensorFlow)")
    say()
    say(f"float32 {peak['float32']:.0f} GFLOP/s, bfloat16 {peak['mixed_bfloat16']:.0f} GFLOP/s ({n}x{n}, best of runs)")
    say()

    steps, warmup = (steps or (4 if quick else 15)), (2 if quick else 3)
    say("## Training speed: precision and XLA (in-memory batches)")
    say()
    say("| recipe | precision | jit_compile | images/s | train GFLOP/s | fraction of the matmul peak |")
    say("| --- | --- | --- | --- | --- | --- |")
    speed = {}
    for recipe in ("fast", "cnn_small"):
        for precision in ("float32", "mixed_bfloat16"):
            for jit in (False, True):
                ips, flops = model_speed(recipe, precision, jit, steps, warmup)
                speed[recipe, precision, jit] = ips
                gflops = 3 * flops * ips / 1e9
                say(f"| {recipe} | {precision} | {jit} | {ips:.0f} | {gflops:.0f} | {gflops / peak[precision]:.2f} |")
    say()
    for recipe in ("fast", "cnn_small"):
        say(f"- {recipe}: bfloat16 speed-up {speed[recipe, 'mixed_bfloat16', False] / speed[recipe, 'float32', False]:.2f}x, "
            f"XLA speed-up {speed[recipe, 'float32', True] / speed[recipe, 'float32', False]:.2f}x (float32)")
    say()

    real, cached = pipeline_overhead("fast", data, 4 if quick else 10, 2 if quick else 5)
    say("## Overheads")
    say()
    say(f"- pipeline: real input pipeline {real:.0f} images/s / pre-augmented cached tensors {cached:.0f} images/s "
        f"= {real / cached:.3f}")
    p_ips, bare_ips, p_run = platform_overhead("fast", data, limit or (2048 if quick else 10240))
    say(f"- platform: `cifarflow train` {p_ips:.0f} images/s / bare `model.fit` {bare_ips:.0f} images/s "
        f"= {p_ips / bare_ips:.3f} (run `{p_run}`; target >= 0.97)")
    say()

    say("## Export latency (CNN baseline)")
    say()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "export_latency.py"), "--model", export_model,
                           "--data", data, "--threads", str(os.cpu_count() or 1)] + (["--calls", "50"] if quick else []),
                          capture_output=True, text=True)
    if proc.returncode == 0:
        say("```")
        say(proc.stdout.strip())
        say("```")
    else:
        say(f"skipped: export_latency.py failed ({(proc.stderr.strip().splitlines() or ['?'])[-1]}); make the files "
            f"with `cifarflow register <run> --promote` and `cifarflow export {export_model} --format all "
            "--quantize all --data ...`")
    say()

    say("## Time to accuracy: `cifarflow train fast`")
    say()
    say("| variant | epochs | test_accuracy | test_accuracy_tta | wall s | train s | images/s | run |")
    say("| --- | --- | --- | --- | --- | --- | --- | --- |")
    variants = [("short", min(short_epochs, 2))] if quick else [("full", None), ("short", short_epochs)]
    for name, epochs in variants:
        r = time_to_accuracy(data, epochs, limit)
        tta = f"{r['test_accuracy_tta']:.4f}" if r["test_accuracy_tta"] is not None else "-"
        say(f"| {name} | {r['epochs']} | {r['test_accuracy']:.4f} | {tta} | {r['wall_seconds']:.0f} | "
            f"{r['train_seconds']:.0f} | {r['images_per_second']:.0f} | `{r['run_id']}` |")
    say()
    say(f"Load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    out.write_text("\n".join(lines) + "\n")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
