"""One benchmark run: every speed figure of issue 12 as a ratio or fraction measured side by side.

    python bench/run.py --data ../shared/data/cifar10-jpeg.tar.gz --quick \\
        --fast-run FULL_RUN_ID --short-run SHORT_RUN_ID        # about 13 minutes on an idle 2-core CPU
    python bench/run.py --data ../shared/data/cifar10-jpeg.tar.gz   # full; without run ids it trains `fast` twice
    python bench/run.py --data TINY_FOLDER --smoke                  # functional check only (the tests)

Prints, and writes to ``bench/RESULTS.md`` (``--out``), with the machine (from the
system), date, commit, the time each section took, every figure and the MLflow run id
behind each accuracy (``bench/README.md`` says how to read it):

1. ``peak``: matmul peak of this CPU (TensorFlow, float32 and bfloat16, GFLOP/s);
2. ``speed``: training images/s of ``fast`` and ``cnn_small`` on in-memory batches under
   float32 vs mixed_bfloat16 and ``jit_compile`` off vs on (speed-ups as ratios), and the
   achieved training GFLOP/s (forward FLOPs per image from the layers x 3 x images/s) as a
   fraction of the peak of the same dtype;
3. ``overhead``: pipeline overhead (images/s through the real input pipeline over images/s on
   pre-augmented cached tensors, alternating rounds, each timed from its epoch's start to its
   end) and platform overhead (images/s of ``cifarflow train``, MLflow logging, callbacks and
   checkpoints included, over a bare ``model.fit`` of the same model on the same pipeline; both
   the median epoch, timed from its start to the next one's, after an epoch of tracing,
   alternating rounds);
4. ``export``: batch-1 latency and batch-256 throughput of Keras (``tf.function``) vs ONNX Runtime
   vs LiteRT float32 and int8 on the CNN baseline (``--export-recipe``), exported by this run from
   an untrained model (speed does not depend on the weights), same threads for every runtime;
5. ``accuracy``: time to accuracy of ``fast``: test accuracy with and without TTA, epochs, train
   and wall seconds, images/s and the run id, read from the MLflow store (``--fast-run``,
   ``--short-run``) or, without ids, trained here (the full recipe and the short variant);
6. optional: ``--bf16-profile`` (``bench/bf16_profile.py --quick``) and ``--backends``
   (``bench/backends.py``).

Run it on an otherwise idle machine: figures from a loaded machine mean little.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import click  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # export_latency.timed


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


def model_speed(recipe: str, precision: str, jit: bool, steps: int, warmup: int,
                batch: int | None = None) -> tuple[float, int, int]:
    """Training images/s of ``recipe``'s model on in-memory random pixels.

    The model is built and compiled as the trainer does (its optimizer, schedule, loss),
    then recompiled with ``jit_compile=jit``; ``warmup`` untimed steps (tracing, XLA
    compilation, oneDNN primitive caches), then ``steps`` timed steps.

    Returns:
        ``(images_per_second, forward_flops_per_image, batch_size)``.
    """
    import numpy as np

    from cifarflow import config
    from cifarflow.data import pipeline
    from cifarflow.models.flops import flops_per_image
    from cifarflow.training import trainer

    cfg = config.resolve(recipe, {"precision": precision} | ({"batch_size": batch} if batch else {}))
    with trainer.dtype_policy(precision):
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (cfg.batch_size, 32, 32, 3)).astype(np.uint8)
        y = rng.integers(0, 10, cfg.batch_size)
        model = trainer.build_and_compile(cfg, 10, x)
        model.compile(optimizer=trainer.make_optimizer(cfg, 50), loss=model.loss, metrics=["accuracy"],
                      jit_compile=jit)
        ds = pipeline.one_batch_repeated(x, y)  # the step alone; no autotuning wake-up ends each fit
        model.fit(ds, steps_per_epoch=warmup, epochs=1, verbose=0, shuffle=False)
        start = time.perf_counter()
        model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
        return steps * cfg.batch_size / (time.perf_counter() - start), flops_per_image(model), cfg.batch_size


def pipeline_overhead(recipe: str, data: str, steps: int, rounds: int,
                      batch: int | None = None) -> tuple[float, float]:
    """Median images/s through the real input pipeline and on pre-augmented cached tensors (same model).

    Each ``fit`` of one epoch is timed from its epoch's start to its end (:class:`EpochClock`), batches
    fetched from the pipeline and trained on: ``fit``'s own set-up and tear-down are left out, as they
    are the same for both arms but vary by seconds from call to call (on a 2-core host, 0 to 5 s after
    ``on_train_end`` in either arm; with a few steps per call they outweighed the pipeline and made the
    cached arm look slower). Returns ``(real_images_per_second, cached_images_per_second)``.
    """
    import numpy as np
    import tensorflow as tf

    from cifarflow import config
    from cifarflow.data import datasets, pipeline
    from cifarflow.training import trainer

    cfg = config.resolve(recipe, {"data": data} | ({"batch_size": batch} if batch else {}))
    ds = datasets.load(cfg.data)
    n = min(steps * cfg.batch_size, len(ds.y_train))
    idx = np.random.default_rng(0).permutation(len(ds.y_train))[:n]
    x, y = ds.x_train[idx], ds.y_train[idx]
    model = trainer.build_and_compile(cfg, ds.num_classes, x)
    real, callbacks = trainer.training_data(cfg, x, y, ds.num_classes)
    pre = [(np.asarray(i), np.asarray(l)) for i, l in real]
    cached = tf.data.Dataset.from_tensor_slices((np.concatenate([p[0] for p in pre]),
                                                 np.concatenate([p[1] for p in pre])))
    cached = pipeline.without_autotuning(cached.batch(cfg.batch_size).cache().prefetch(tf.data.AUTOTUNE))

    def ips(dataset) -> float:
        clock = EpochClock.make()
        model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[*callbacks, clock])
        return n / clock.inside(0)

    ips(real), ips(cached)
    a, b = [], []
    for _ in range(rounds):
        a.append(ips(real))
        b.append(ips(cached))
    return statistics.median(a), statistics.median(b)


class EpochClock:
    """A Keras callback factory: seconds from each epoch's start to the next one's (every callback included,
    :meth:`seconds`) or to its own end (its batches only, :meth:`inside`)."""

    @staticmethod
    def make():
        import keras

        class Clock(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.starts: list[float] = []
                self.ends: list[float] = []

            def on_epoch_begin(self, epoch, logs=None):
                self.starts.append(time.perf_counter())

            def on_epoch_end(self, epoch, logs=None):
                self.ends.append(time.perf_counter())

            def on_train_end(self, logs=None):
                self.starts.append(time.perf_counter())

            def seconds(self, epoch: int) -> float:
                return self.starts[epoch + 1] - self.starts[epoch]

            def inside(self, epoch: int) -> float:
                return self.ends[epoch] - self.starts[epoch]

        return Clock()


def platform_overhead(recipe: str, data: str, limit: int, batch: int | None = None,
                      rounds: int = 1, epochs: int = 6) -> tuple[float, float, str]:
    """Images/s of ``cifarflow train`` and of a bare ``model.fit``: the median epoch, tracing epoch left out.

    Both arms train the same recipe on the same images (``limit`` as for ``cifarflow train``)
    through :func:`cifarflow.training.trainer.training_data` for ``epochs`` epochs; each epoch is
    timed from its start to the next epoch's start, so the platform's end-of-epoch work (MLflow
    logging, checkpoints, callbacks) counts. Epoch 1 (tracing) is left out; the arms alternate
    for ``rounds`` rounds and each arm's images/s is ``limit`` over its median epoch of all
    rounds. The median, not a sum: on the 2-core host an epoch of the same steps takes either
    about 14.6 s or about 20.5 s, the extra 6 s landing on random epochs of either arm (one
    epoch per arm gave ratios from 0.92 to 1.10, a sum over two 0.873); the platform's own work
    is about 0.08 s per epoch (its checkpoint 0.07 s, MLflow logging 0.005 s).

    Returns:
        ``(platform_images_per_second, bare_images_per_second, last_platform_run_id)``.

    Raises:
        ValueError: ``epochs`` < 2 (nothing left to time after the tracing epoch).
    """
    from cifarflow import config
    from cifarflow.training import trainer

    if epochs < 2:
        raise ValueError(f"platform_overhead needs at least 2 epochs (the first traces), got {epochs}")
    overrides = {"data": data, "limit": limit, "epochs": epochs, "tta": "none"} | ({"batch_size": batch} if batch else {})
    cfg = config.resolve(recipe, overrides)
    splits = trainer.load_splits(cfg)
    n = len(splits.y_train)
    platform, bare, run_id = [], [], ""
    for _ in range(rounds):
        clock = EpochClock.make()
        run_id = trainer.train(cfg, quiet=True, run_name=f"bench-platform-{recipe}", extra_callbacks=[clock]).run_id
        platform.append(clock)

        with trainer.dtype_policy(cfg.precision):
            trainer.seed_everything(cfg.seed)
            model = trainer.build_and_compile(cfg, splits.ds.num_classes, splits.x_train)
            train_ds, callbacks = trainer.training_data(cfg, splits.x_train, splits.y_train, splits.ds.num_classes)
            clock = EpochClock.make()
            model.fit(train_ds, epochs=epochs, verbose=0, shuffle=False, callbacks=[clock, *callbacks])
        bare.append(clock)
    return median_epoch_images_per_second(n, platform), median_epoch_images_per_second(n, bare), run_id


def median_epoch_images_per_second(images: int, clocks: list) -> float:
    """``images`` over the median of every epoch but the first (tracing) of each :class:`EpochClock` in
    ``clocks``, timed from its start to the next one's; a stalled epoch or two do not move it."""
    return images / statistics.median(c.seconds(i) for c in clocks for i in range(1, len(c.starts) - 1))


def export_speed(recipe: str, data: str, workdir: Path, *, threads: int, calls: int, warmup: int,
                 batch: int, batch_calls: int) -> tuple[list[dict], int]:
    """Batch-1 latency and batch-``batch`` throughput of Keras, ONNX Runtime and LiteRT float32/int8.

    The recipe's model is built untrained (normalization from the training images) and
    exported here with :mod:`cifarflow.deploy.export` (ONNX; LiteRT float32 and full-integer
    int8 calibrated on 200 training images): speed does not depend on the weights. ONNX
    Runtime and LiteRT get ``threads`` intra-op threads, Keras TensorFlow's default (every
    core; it cannot be changed once TensorFlow has run); all the same test images.

    Returns:
        ``(rows, param_count)``; a row: ``runtime``, ``median_ms`` and ``p90_ms`` (batch 1),
        ``images_per_second`` (batch ``batch``, median of ``batch_calls`` calls), ``size_kib``
        (file; None for Keras), ``max_abs_diff`` (probabilities vs Keras on the batch).
    """
    import numpy as np
    import onnxruntime as ort
    import tensorflow as tf

    from cifarflow import config
    from cifarflow.data import datasets
    from cifarflow.deploy import export
    from cifarflow.training import trainer
    from export_latency import timed

    cfg = config.resolve(recipe, {"data": data})
    ds = datasets.load(cfg.data)
    trainer.seed_everything(cfg.seed)
    model = trainer.build_and_compile(cfg, ds.num_classes, ds.x_train)
    onnx_path = export.to_onnx(model, workdir / "model.onnx")
    tflite = export.to_tflite(model, workdir, ["none", "int8"], trainer.sample_images(ds.x_train, 200, cfg.seed))

    reps = -(-batch // len(ds.x_test))
    big = np.concatenate([ds.x_test] * reps)[:batch].astype(np.float32)
    ones = [big[i:i + 1] for i in range(min(len(big), 200))]

    graph = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec((None, 32, 32, 3))])
    runtimes = {"keras (tf.function)": (lambda x: graph(x).numpy(), None)}
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runtimes["onnx runtime"] = (lambda x: session.run(None, {name: x})[0], onnx_path)
    for kind, path in tflite.items():
        interps = {}

        def run_tflite(x, interps=interps, path=path):
            if len(x) not in interps:  # one interpreter per batch size, tensors allocated once
                it = export.tflite_interpreter(path, num_threads=threads)
                inp = it.get_input_details()[0]["index"]
                it.resize_tensor_input(inp, list(x.shape))
                it.allocate_tensors()
                interps[len(x)] = (it, inp, it.get_output_details()[0]["index"])
            it, inp, out = interps[len(x)]
            it.set_tensor(inp, x)
            it.invoke()
            return it.get_tensor(out)

        runtimes[f"litert {kind.removeprefix('tflite_')}"] = (run_tflite, path)

    reference = graph(big).numpy()
    rows = []
    for runtime, (fn, path) in runtimes.items():
        t = timed(fn, ones, warmup, calls)
        fn(big)
        seconds = []
        for _ in range(batch_calls):
            start = time.perf_counter()
            probs = fn(big)
            seconds.append(time.perf_counter() - start)
        rows.append({"runtime": runtime, "median_ms": statistics.median(t),
                     "p90_ms": statistics.quantiles(t, n=10)[-1] if len(t) > 1 else t[0],
                     "images_per_second": batch / statistics.median(seconds),
                     "size_kib": path.stat().st_size / 1024 if path else None,
                     "max_abs_diff": float(np.abs(np.asarray(probs, np.float64) - reference).max())})
    return rows, model.count_params()


def run_figures(run_id: str) -> dict:
    """A finished training run's figures from the MLflow store (``MLFLOW_TRACKING_URI``).

    Returns:
        ``run_id``, ``recipe`` (tag), ``epochs``, ``test_accuracy``, ``test_accuracy_tta`` (or
        None), ``train_seconds``, ``wall_seconds`` (run start to end; None while it runs) and
        ``images_per_second`` (training images x epochs / train_seconds).

    Raises:
        click.ClickException: no such run, or a run without ``test_accuracy``/``train_seconds``.
    """
    import mlflow

    try:
        run = mlflow.tracking.MlflowClient().get_run(run_id)
    except Exception as exc:
        raise click.ClickException(f"run {run_id}: {str(exc).splitlines()[0]} (check MLFLOW_TRACKING_URI)") from None
    m, p = run.data.metrics, run.data.params
    missing = [k for k in ("test_accuracy", "train_seconds") if k not in m]
    if missing:
        raise click.ClickException(f"run {run_id} has no {', '.join(missing)} (is it a finished training run?)")
    epochs = int(p.get("epochs", 0))
    end = run.info.end_time
    return {"run_id": run_id, "recipe": run.data.tags.get("cifarflow.recipe", "?"), "epochs": epochs,
            "test_accuracy": m["test_accuracy"], "test_accuracy_tta": m.get("test_accuracy_tta"),
            "train_seconds": m["train_seconds"],
            "wall_seconds": (end - run.info.start_time) / 1000 if end else None,
            "images_per_second": int(p.get("train_images", 0)) * epochs / m["train_seconds"]}


def train_fast(data: str, epochs: int | None, limit: int | None = None) -> str:
    """``cifarflow train fast`` end to end (``epochs`` overrides the recipe's); its run id."""
    from cifarflow import config
    from cifarflow.training import trainer

    overrides = {"data": data} | ({"limit": limit} if limit else {}) | ({"epochs": epochs} if epochs else {})
    cfg = config.resolve("fast", overrides)
    return trainer.train(cfg, quiet=True, run_name=f"bench-fast-e{cfg.epochs}").run_id


SECTIONS = ("peak", "speed", "overhead", "export", "accuracy")


# --quick without run ids trains 1 epoch of `fast` on this many training images, stratified: on the slower
# 2-core host the whole --quick run took 1,050 s with all 50,000 and 895 s with 25,000 (budget: 15 minutes)
QUICK_RUN_IMAGES = 10000


@click.command()
@click.option("--data", default="cifar10", show_default=True, help="Data source (as for cifarflow train).")
@click.option("--quick", is_flag=True,
              help="Fewer steps and rounds; without run ids, only a 1-epoch `fast` run on 10,000 training images "
                   "(< 15 min on an idle 2-core CPU).")
@click.option("--smoke", is_flag=True,
              help="Tiny batches and steps everywhere: checks that every section runs (tests); figures meaningless.")
@click.option("--fast-run", "fast_runs", multiple=True, metavar="RUN_ID",
              help="A finished full `fast` run to report instead of training one (repeatable: seeds).")
@click.option("--short-run", "short_runs", multiple=True, metavar="RUN_ID",
              help="A finished short `fast` run (an epochs override) to report instead of training one (repeatable).")
@click.option("--short-epochs", default=4, show_default=True, help="Epochs of the short fast variant when trained here.")
@click.option("--export-recipe", default="cnn", show_default=True, help="Recipe of the CNN baseline timed for export.")
@click.option("--threads", default=os.cpu_count() or 1, show_default=True,
              help="Threads of ONNX Runtime and LiteRT (export; Keras uses TensorFlow's default, every core).")
@click.option("--steps", type=int, default=None, help="Timed steps per speed measurement (default: 3 quick, 12 full).")
@click.option("--limit", type=int, default=None,
              help="Training images (stratified) of the fast runs trained here (--quick: 10,000; "
                   "a functional check, not comparable).")
@click.option("--sections", default=",".join(SECTIONS), show_default=True,
              help="Comma-separated sections to run (of " + ", ".join(SECTIONS) + ").")
@click.option("--no-xla", is_flag=True, help="Skip the jit_compile=True measurements (XLA compiles are slow).")
@click.option("--bf16-profile", is_flag=True, help="Also run bench/bf16_profile.py --quick and include its report.")
@click.option("--backends", is_flag=True, help="Also run bench/backends.py (TensorFlow vs JAX), when present.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=REPO / "bench" / "RESULTS.md",
              show_default=True)
def main(data: str, quick: bool, smoke: bool, fast_runs: tuple[str, ...], short_runs: tuple[str, ...],
         short_epochs: int, export_recipe: str, threads: int, steps: int | None, limit: int | None, sections: str,
         no_xla: bool, bf16_profile: bool, backends: bool, out: Path) -> None:
    """Run the benchmark and write RESULTS.md (see the module docstring)."""
    wanted = {s.strip() for s in sections.split(",") if s.strip()}
    if wanted - set(SECTIONS):
        raise click.BadParameter(f"unknown section(s) {', '.join(sorted(wanted - set(SECTIONS)))}", param_hint="--sections")
    lines: list[str] = []
    began = time.perf_counter()

    def say(text: str = "") -> None:
        click.echo(text)
        lines.append(text)

    def took(since: float) -> None:
        say(f"_Section time: {time.perf_counter() - since:.0f} s._")
        say()

    mode = " --smoke" if smoke else " --quick" if quick else ""
    batch = 16 if smoke else None  # the recipes' own batch sizes unless --smoke
    steps = steps or (1 if smoke else 3 if quick else 12)
    warmup = 1 if smoke else 2
    info = machine()
    say(f"# Benchmark results (`bench/run.py{mode}`)")
    say()
    say(f"{info['date']}, commit `{info['commit']}`. Machine: {info['cpu']}, {info['cores']} cores, "
        f"{info['memory']}, flags {info['cpu_flags'] or '-'}; load average at start {info['load_average']}. "
        f"Python {info['python']}, TensorFlow {info['tensorflow']}, Keras {info['keras']} ({info['backend']}). "
        f"Data: `{data}`.")
    if smoke:
        say()
        say("**Smoke run: tiny batches and steps on whatever data was given; the figures mean nothing.**")
    say()

    peak = {}
    if wanted & {"peak", "speed"}:
        t0 = time.perf_counter()
        n = 256 if smoke else 2048 if quick else 4096
        reps = 2 if smoke else 3 if quick else 10
        peak = {"float32": matmul_peak("float32", n, reps), "mixed_bfloat16": matmul_peak("bfloat16", n, reps)}
        say("## Matmul peak (TensorFlow)")
        say()
        say(f"float32 {peak['float32']:.0f} GFLOP/s, bfloat16 {peak['mixed_bfloat16']:.0f} GFLOP/s "
            f"({n}x{n}, best of {reps}; ratio {peak['mixed_bfloat16'] / peak['float32']:.2f})")
        say()
        took(t0)

    if "speed" in wanted:
        t0 = time.perf_counter()
        say("## Training speed: precision and XLA (in-memory batches, the recipes' optimizers)")
        say()
        say(f"{steps} timed steps after {warmup} untimed. Train GFLOP/s = forward FLOPs per image x 3 x images/s; "
            "the fraction is of the matmul peak of the same dtype.")
        say()
        say("| recipe | batch | precision | jit_compile | images/s | train GFLOP/s | fraction of the matmul peak |")
        say("| --- | --- | --- | --- | --- | --- | --- |")
        speed = {}
        for recipe in ("fast", "cnn_small"):
            for precision in ("float32", "mixed_bfloat16"):
                for jit in (False,) if no_xla else (False, True):
                    ips, flops, b = model_speed(recipe, precision, jit, steps, warmup, batch)
                    speed[recipe, precision, jit] = ips
                    gflops = 3 * flops * ips / 1e9
                    say(f"| {recipe} | {b} | {precision} | {jit} | {ips:.0f} | {gflops:.0f} | "
                        f"{gflops / peak[precision]:.2f} |")
        say()
        for recipe in ("fast", "cnn_small"):
            s = lambda p, j: speed[recipe, p, j]  # noqa: E731
            bf16 = f"- {recipe}: bfloat16 speed-up {s('mixed_bfloat16', False) / s('float32', False):.2f}x"
            if no_xla:
                say(bf16 + "; XLA speed-up not measured (--no-xla)")
                continue
            say(f"{bf16} (with XLA {s('mixed_bfloat16', True) / s('float32', True):.2f}x); "
                f"XLA speed-up {s('float32', True) / s('float32', False):.2f}x float32, "
                f"{s('mixed_bfloat16', True) / s('mixed_bfloat16', False):.2f}x bfloat16")
        say()
        took(t0)

    if "overhead" in wanted:
        t0 = time.perf_counter()
        say("## Overheads (`fast`)")
        say()
        real, cached = pipeline_overhead("fast", data, 2 if smoke else 3 if quick else 6,
                                         1 if smoke else 2 if quick else 3, batch)
        say(f"- pipeline: real input pipeline {real:.0f} images/s / pre-augmented cached tensors {cached:.0f} images/s "
            f"= {real / cached:.3f} (epoch start to end, median of alternating rounds)")
        p_rounds, p_epochs = (1, 3) if smoke else (2, 4) if quick else (3, 6)
        p_ips, bare_ips, p_run = platform_overhead("fast", data, 8 if smoke else 4096, batch,
                                                   p_rounds, p_epochs)
        say(f"- platform: `cifarflow train` {p_ips:.0f} images/s / bare `model.fit` {bare_ips:.0f} images/s "
            f"= {p_ips / bare_ips:.3f} (median epoch of epochs 2-{p_epochs} of {p_epochs}, start to start, "
            f"{p_rounds} alternating round(s); last run `{p_run}`; goal >= 0.97)")
        say()
        took(t0)

    if "export" in wanted:
        t0 = time.perf_counter()
        b = 16 if smoke else 256
        calls = 5 if smoke else 50 if quick else 200
        with tempfile.TemporaryDirectory() as tmp:
            rows, params = export_speed(export_recipe, data, Path(tmp), threads=threads, calls=calls,
                                        warmup=2 if smoke else 20, batch=b, batch_calls=2 if smoke else 5 if quick else 20)
        say(f"## Export: Keras vs ONNX Runtime vs LiteRT (`{export_recipe}`, {params:,} params)")
        say()
        say(f"Untrained `{export_recipe}` model exported by this run (speed does not depend on the weights; "
            f"int8 calibrated on 200 training images); ONNX Runtime and LiteRT {threads} threads, Keras TensorFlow's "
            f"default ({os.cpu_count()} cores); batch 1: {calls} timed calls "
            f"of single test images; batch {b}: median of repeated calls.")
        say()
        keras_row = rows[0]
        say(f"| runtime | batch-1 median ms | batch-1 p90 ms | batch-1 speed-up vs Keras | batch-{b} images/s | "
            f"batch-{b} speed-up vs Keras | size KiB | max abs diff vs Keras |")
        say("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            size = f"{r['size_kib']:.0f}" if r["size_kib"] else "-"
            say(f"| {r['runtime']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
                f"{keras_row['median_ms'] / r['median_ms']:.2f}x | {r['images_per_second']:.0f} | "
                f"{r['images_per_second'] / keras_row['images_per_second']:.2f}x | {size} | {r['max_abs_diff']:.1e} |")
        say()
        took(t0)

    if "accuracy" in wanted:
        t0 = time.perf_counter()
        say("## Time to accuracy: `cifarflow train fast`")
        say()
        trained = not (fast_runs or short_runs)
        if trained:
            plan = [("short", 1)] if smoke or quick else [("full", None), ("short", short_epochs)]
            images = limit or (8 if smoke else QUICK_RUN_IMAGES if quick else None)
            runs = [(name, train_fast(data, epochs, images)) for name, epochs in plan]
            say("Trained by this run (no `--fast-run`/`--short-run` given)"
                + (f", on {images:,} training images." if images else "."))
        else:
            runs = [("full", r) for r in fast_runs] + [("short", r) for r in short_runs]
            say(f"Read from the MLflow store `{os.environ.get('MLFLOW_TRACKING_URI', '(default)')}`.")
        say()
        say("| variant | epochs | test_accuracy | test_accuracy_tta | wall s (run start to end) | train s | "
            "images/s | run |")
        say("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, run_id in runs:
            r = run_figures(run_id)
            tta = f"{r['test_accuracy_tta']:.4f}" if r["test_accuracy_tta"] is not None else "-"
            wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] is not None else "running"
            recipe = "" if r["recipe"] in ("fast", "?") else f" (recipe {r['recipe']})"
            say(f"| {name}{recipe} | {r['epochs']} | {r['test_accuracy']:.4f} | {tta} | {wall} | "
                f"{r['train_seconds']:.0f} | {r['images_per_second']:.0f} | `{run_id}` |")
        say()
        took(t0)

    for flag, script, args in ((bf16_profile, "bf16_profile.py", ["--quick"] + (["--batch", "16", "--steps", "1",
                                                                               "--warmup", "1", "--no-plain"]
                                                                              if smoke else [])),
                               (backends, "backends.py", ["--data", data] + (["--quick"] if quick or smoke else []))):
        if not flag:
            continue
        t0 = time.perf_counter()
        say(f"## `bench/{script}`")
        say()
        path = REPO / "bench" / script
        if not path.is_file():
            say(f"not run: `bench/{script}` is not in this checkout.")
        else:
            proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True)
            text = proc.stdout.strip()
            if proc.returncode:
                text += f"\n\n(failed, exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]})"
            say(text.replace("\n# ", "\n### ").replace("\n## ", "\n### ").removeprefix("# "))
        say()
        took(t0)

    say(f"Total {time.perf_counter() - began:.0f} s. Load average at the end: "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    out.write_text("\n".join(lines) + "\n")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
