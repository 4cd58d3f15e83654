"""Where a training step's time goes, float32 vs mixed_bfloat16, primitive by primitive (issue 12).

For each recipe x precision (x batch size x activation variant) a child process trains the
recipe's compiled model on in-memory random pixels with oneDNN's verbose log on
(``ONEDNN_VERBOSE=profile_exec`` with timestamps; TensorFlow's CPU kernels for convolution,
pooling, matmul and softmax are oneDNN primitives). The lines of the timed steps are parsed into:

- the step's wall time, and the time *inside* oneDNN primitives by kind (convolution
  forward / backward-data / backward-weights, pooling, matmul, reorder, softmax, ...),
  with each kind's implementation (``brg_conv_fwd:avx512_core_bf16``, ``jit:uni``, ``gemm``,
  ``ref``...) and source data type, per step and as a share of all primitive time;
- the part of the step during which no primitive ran (the union of the primitives'
  intervals, since TensorFlow runs independent ops at once): TensorFlow's own (Eigen) kernels. Keras' BatchNormalization
  (moments and normalization, computed in float32 with casts around it), GELU (``erf``),
  the casts of mixed precision, the optimizer update and the loss run there;
- per layer: the convolution primitives mapped to the model's Conv2D layers by shape.

Shares are robust to a busy machine; absolute milliseconds are not: run it on an idle machine.
First, single ops (:func:`micro`): forward + backward of every conv shape of both nets, GELU,
ReLU, BatchNorm and casts, float32 vs bfloat16 alternating in one process. Also prints the plain step time (no verbose log) of every configuration and the
bfloat16/float32 speed-ups, so the logging overhead can be judged.

    python bench/bf16_profile.py --quick                      # ~5 min on an idle 2-core CPU
    python bench/bf16_profile.py --micro --batch 256          # single ops only
    python bench/bf16_profile.py --batch 256 --batch 1024 --act gelu --act gelu_tanh --act relu \\
        --set fast:widths=[128,384,384] --out bench/BF16.md   # ~15 min

``--act`` changes the ``fast`` net for profiling only (the recipe's net keeps exact GELU):
``gelu`` (exact, erf; airbench94's ``nn.GELU()``), ``gelu_tanh`` (tanh approximation),
``relu``, or ``gelu_float32`` (exact GELU, with BatchNorm and GELU layers computing and
passing on float32 under mixed_bfloat16: one bf16/f32 cast pair per block instead of two,
and GELU out of Eigen's slower bfloat16 path).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("float32", "mixed_bfloat16")
CONV_DESC = re.compile(r"mb(\d+)_ic(\d+)oc(\d+)_ih(\d+)oh(\d+)kh(\d+)")


def child(spec: dict) -> dict:
    """Train ``spec['recipe']`` for ``spec['warmup']`` then ``spec['steps']`` steps; return timing marks (ms)."""
    import keras
    import numpy as np

    from cifarflow import config
    from cifarflow.data import pipeline
    from cifarflow.training import trainer

    keras.config.set_dtype_policy(spec["precision"])
    cfg = config.resolve(spec["recipe"], {"precision": spec["precision"], **spec["overrides"]})
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (spec["batch"], 32, 32, 3)).astype(np.uint8)
    y = rng.integers(0, 10, spec["batch"])
    model = trainer.build_and_compile(cfg, 10, x)
    if spec["act"] == "gelu_float32":  # BatchNorm + GELU compute and output float32: one cast pair per block
        for layer in model.layers:
            if isinstance(layer, (keras.layers.Activation, keras.layers.BatchNormalization)) and "probs" != layer.name:
                layer.dtype_policy = keras.DTypePolicy("float32")
    elif spec["act"] != "gelu":
        fn = {"gelu_tanh": lambda t: keras.activations.gelu(t, approximate=True),
              "relu": keras.activations.relu}[spec["act"]]
        for layer in model.layers:
            if isinstance(layer, keras.layers.Activation) and "gelu" in layer.name:
                layer.activation = fn
    ds = pipeline.one_batch_repeated(x, y)  # the step alone; no autotuning wake-up ends each fit
    model.fit(ds, steps_per_epoch=spec["warmup"], epochs=1, verbose=0)
    sys.stdout.flush()
    start = time.time() * 1000
    model.fit(ds, steps_per_epoch=spec["steps"], epochs=1, verbose=0)
    end = time.time() * 1000
    convs = [{"name": layer.name, "ic": int(layer.input.shape[-1]), "oc": layer.filters,
              "ih": int(layer.input.shape[1]), "kh": layer.kernel_size[0]}
             for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    return {"start": start, "end": end, "convs": convs}


def run_child(spec: dict, verbose: bool) -> tuple[dict, list[str]]:
    """Run :func:`child` in a fresh process (``ONEDNN_VERBOSE`` on or off); its marks and log lines."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ONEDNN_VERBOSE", None)
    if verbose:
        env |= {"ONEDNN_VERBOSE": "profile_exec", "ONEDNN_VERBOSE_TIMESTAMP": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        marks = Path(tmp) / "marks.json"
        log = Path(tmp) / "onednn.log"
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bf16_profile as b; "
                f"json.dump(b.child(json.loads(sys.argv[1])), open({str(marks)!r}, 'w'))")
        with log.open("w") as out:
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, stdout=out,
                                  stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise click.ClickException(f"profiling child failed: {proc.stderr.strip()[-2000:]}")
        return json.loads(marks.read_text()), log.read_text().splitlines()


def parse(lines: list[str], start: float, end: float) -> list[dict]:
    """oneDNN ``exec`` lines (verbose v1 with timestamps) between ``start`` and ``end`` (ms since the epoch).

    Each: ``kind`` (``convolution``, ``reorder``...), ``impl``, ``prop`` (``forward_training``,
    ``backward_data``, ``backward_weights``...), ``dtype`` (the source's), ``desc`` and ``ms``.
    """
    out = []
    for line in lines:
        f = line.split(",")
        if len(f) < 12 or f[0] != "onednn_verbose" or f[3] != "primitive" or f[4] != "exec":
            continue
        try:
            stamp, ms = float(f[2]), float(f[-1])
        except ValueError:
            continue
        if not start <= stamp <= end:
            continue
        dtype = (re.search(r"src:([a-z0-9]+)", f[9]) or re.search(r":([a-z0-9]+):", f[9]))
        out.append({"kind": f[6], "impl": f[7], "prop": f[8], "dtype": dtype.group(1) if dtype else "?",
                    "desc": f[-2], "ms": ms, "start": stamp})
    return out


def busy_ms(prims: list[dict]) -> float:
    """Wall time (ms) during which at least one primitive ran: the union of their [start, start + ms] intervals.

    TensorFlow runs independent ops (a layer's backward-data and backward-weights
    convolutions) at once on its inter-op threads, so the primitives' own times can sum to
    more than the step.
    """
    total, end = 0.0, float("-inf")
    for start, stop in sorted((p["start"], p["start"] + p["ms"]) for p in prims):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(prims: list[dict], marks: dict, steps: int) -> dict:
    """Per-step ms by kind (and prop), implementations, reorder count, and conv ms per layer."""
    step_ms = (marks["end"] - marks["start"]) / steps
    by_kind: dict[str, dict] = collections.defaultdict(lambda: {"ms": 0.0, "n": 0, "impl": set(), "dtype": set()})
    layers = collections.defaultdict(float)
    for p in prims:
        key = p["kind"] + ("" if p["prop"] in ("undef", "") else f" {p['prop']}")
        k = by_kind[key]
        k["ms"] += p["ms"] / steps
        k["n"] += 1
        k["impl"].add(p["impl"])
        k["dtype"].add(p["dtype"])
        m = CONV_DESC.search(p["desc"]) if p["kind"] == "convolution" else None
        if m:
            ic, oc, ih, kh = (int(m.group(i)) for i in (2, 3, 4, 6))
            name = "+".join(c["name"] for c in marks["convs"]
                            if (c["ic"], c["oc"], c["ih"], c["kh"]) == (ic, oc, ih, kh)) or f"ic{ic}oc{oc}ih{ih}"
            layers[name] += p["ms"] / steps
    return {"step_ms": step_ms, "inside_ms": busy_ms(prims) / steps, "sum_ms": sum(k["ms"] for k in by_kind.values()),
            "kinds": dict(by_kind), "layers": dict(layers),
            "reorders": by_kind.get("reorder", {"n": 0})["n"] / steps}


def fmt_kinds(s: dict) -> list[str]:
    """Markdown rows of :func:`summarize`'s kinds, largest first (share: of all primitive time), then the
    part of the step during which no primitive ran (share: of the step)."""
    rows = []
    for kind, k in sorted(s["kinds"].items(), key=lambda kv: -kv[1]["ms"]):
        rows.append(f"| {kind} | {k['n'] / max(s['_steps'], 1):.0f} | {k['ms']:.1f} | {k['ms'] / s['sum_ms']:.1%} | "
                    f"{'/'.join(sorted(k['dtype']))} | {', '.join(sorted(k['impl']))} |")
    rest = s["step_ms"] - s["inside_ms"]
    rows.append(f"| no primitive running (TF/Eigen: BatchNorm, GELU, casts, optimizer, loss) | | {rest:.1f} | "
                f"{rest / s['step_ms']:.1%} | | |")
    return rows


# (name, input H=W, in channels, out channels, kernel): the conv layers of the two nets at 32x32 input
FAST_CONVS = [("fast whiten", 32, 3, 24, 2), ("fast block1_conv1", 31, 24, 64, 3), ("fast block1_conv2", 15, 64, 64, 3),
              ("fast block2_conv1", 15, 64, 256, 3), ("fast block2_conv2, block3_conv1", 7, 256, 256, 3),
              ("fast block3_conv2", 3, 256, 256, 3)]
CNN_SMALL_CONVS = [("cnn_small block1_conv1", 32, 3, 32, 3), ("cnn_small block1_conv2", 32, 32, 32, 3),
                   ("cnn_small block2_conv1", 16, 32, 64, 3), ("cnn_small block2_conv2", 16, 64, 64, 3),
                   ("cnn_small block3_conv1", 8, 64, 128, 3), ("cnn_small block3_conv2", 8, 128, 128, 3)]


def micro(batch: int, reps: int, widths_scale: float = 1.0) -> list[tuple[str, str, float, float]]:
    """Forward + backward (input and kernel gradients) of single ops, float32 vs bfloat16, in one process.

    Each op runs in a ``tf.function``; the two dtypes alternate ``reps`` times and the
    minimum time of each is kept (robust to other processes). The ops: every conv shape of
    ``fast`` and ``cnn_small`` (channels x ``widths_scale``), and at fast's largest activation
    (batch, 15, 15, 256): exact GELU, tanh GELU, ReLU, Keras BatchNormalization (training,
    float32 inside as Keras computes it) and the bf16 <-> f32 casts mixed precision adds.

    Returns:
        ``[(op, shape, float32_ms, bfloat16_ms)]``.
    """
    import keras
    import tensorflow as tf

    def conv_fn(h, cin, cout, k, dtype):
        x = tf.random.normal((batch, h, h, cin), dtype=tf.float32)
        w = tf.random.normal((k, k, cin, cout), dtype=tf.float32) * 0.1
        x, w = tf.cast(x, dtype), tf.cast(w, dtype)

        @tf.function
        def f():
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = tf.nn.conv2d(x, w, 1, "SAME" if k == 3 else "VALID")
                loss = tf.reduce_sum(tf.cast(y, tf.float32))
            return tape.gradient(loss, [x, w])

        return f

    def elementwise_fn(op, dtype):
        x = tf.cast(tf.random.normal((batch, 15, 15, int(256 * widths_scale))), dtype)
        layer = None
        if op == "batchnorm":
            layer = keras.layers.BatchNormalization(scale=False, dtype=keras.DTypePolicy(
                "mixed_bfloat16" if dtype == tf.bfloat16 else "float32"))
            layer.build(x.shape)
        fns = {"gelu (erf)": lambda t: tf.nn.gelu(t, approximate=False),
               "gelu (tanh)": lambda t: tf.nn.gelu(t, approximate=True), "relu": tf.nn.relu,
               "batchnorm": lambda t: layer(t, training=True),
               "cast f32 -> bf16 -> f32": lambda t: tf.cast(tf.cast(tf.cast(t, tf.float32), tf.bfloat16), tf.float32)}

        @tf.function
        def f():
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.cast(fns[op](x), tf.float32))
            return tape.gradient(loss, x)

        return f

    cases = [(name, f"{h}x{h}x{int(cin * (widths_scale if cin > 3 else 1))}->{int(cout * widths_scale)} k{k}",
              lambda d, h=h, cin=cin, cout=cout, k=k: conv_fn(h, int(cin * (widths_scale if cin > 3 else 1)),
                                                              int(cout * widths_scale), k, d))
             for name, h, cin, cout, k in FAST_CONVS + CNN_SMALL_CONVS]
    cases += [(op, f"15x15x{int(256 * widths_scale)}", lambda d, op=op: elementwise_fn(op, d))
              for op in ("gelu (erf)", "gelu (tanh)", "relu", "batchnorm", "cast f32 -> bf16 -> f32")]
    out = []
    for name, shape, make in cases:
        fns = {d: make(d) for d in (tf.float32, tf.bfloat16)}
        best = {d: float("inf") for d in fns}
        for d, f in fns.items():
            f()  # trace, primitive caches
        for _ in range(reps):
            for d, f in fns.items():
                start = time.perf_counter()
                [g.numpy() for g in tf.nest.flatten(f())]
                best[d] = min(best[d], time.perf_counter() - start)
        out.append((name, shape, best[tf.float32] * 1000, best[tf.bfloat16] * 1000))
    return out


@click.command()
@click.option("--recipe", "recipes", multiple=True, default=("fast", "cnn_small"), show_default=True)
@click.option("--batch", "batches", multiple=True, type=int, help="Batch sizes (default 256; 128 with --quick).")
@click.option("--act", "acts", multiple=True, default=("gelu",), show_default=True,
              type=click.Choice(["gelu", "gelu_tanh", "relu", "gelu_float32"]),
              help="fast's GELU layers: exact (the recipe), tanh approximation, ReLU, or BatchNorm + GELU computed "
                   "in float32 under mixed_bfloat16 (profiling only).")
@click.option("--set", "sets", multiple=True, metavar="RECIPE:KEY=VALUE",
              help="Extra configuration: the recipe profiled again with this override (e.g. fast:widths=[128,384,384]).")
@click.option("--steps", type=int, default=None, help="Timed steps (default 5; 2 with --quick).")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--quick", is_flag=True, help="Batch 128, 2 timed steps, exact GELU only: a few minutes.")
@click.option("--micro", "micro_only", is_flag=True,
              help="Only the single-op microbenchmark (conv shapes, GELU, BatchNorm, casts; min of alternating reps).")
@click.option("--micro-reps", default=None, type=int, help="Alternating reps of the microbenchmark (default 10; 4 quick).")
@click.option("--no-plain", is_flag=True, help="Skip the plain (no verbose log) step timings.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report (markdown) here.")
def main(recipes, batches, acts, sets, steps, warmup, quick, micro_only, micro_reps, no_plain, out) -> None:
    """Profile float32 vs mixed_bfloat16: single ops, then training steps with oneDNN's verbose log."""
    from cifarflow import config

    steps = steps or (2 if quick else 5)
    batches = batches or ((128,) if quick else (256,))
    configs = [(r, {}, a) for r in recipes for a in (acts if r == "fast" else ("gelu",))]
    for item in sets:
        recipe, _, kv = item.partition(":")
        configs.append((recipe, config.parse_overrides([kv]), "gelu"))
    lines: list[str] = []

    def say(text: str = "") -> None:
        click.echo(text)
        lines.append(text)

    say(f"# bfloat16 profile (`bench/bf16_profile.py`{' --quick' if quick else ''})")
    say()
    say(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average at start "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; {steps} timed steps after {warmup} warm-up steps. "
        "ms are per training step; shares are of the step's wall time.")
    for batch in batches:
        say()
        say(f"## Single ops, batch {batch}: forward + backward, minimum of alternating float32/bfloat16 reps")
        say()
        say("| op | shape | float32 ms | bfloat16 ms | bfloat16 speed-up |")
        say("| --- | --- | --- | --- | --- |")
        for name, shape, a, b in micro(batch, micro_reps or (4 if quick else 10)):
            say(f"| {name} | {shape} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    summary = []
    for recipe, overrides, act in ([] if micro_only else configs):
        for batch in batches:
            label = f"{recipe}" + (f" {overrides}" if overrides else "") + (f" act={act}" if act != "gelu" else "")
            result = {}
            for precision in PRECISIONS:
                spec = {"recipe": recipe, "precision": precision, "overrides": overrides, "act": act,
                        "batch": batch, "steps": steps, "warmup": warmup}
                marks, log = run_child(spec, verbose=True)
                s = summarize(parse(log, marks["start"], marks["end"]), marks, steps)
                s["_steps"] = steps
                if not no_plain:
                    plain, _ = run_child(spec, verbose=False)
                    s["plain_ms"] = (plain["end"] - plain["start"]) / steps
                result[precision] = s
                say()
                say(f"## {label}, batch {batch}, {precision}")
                say()
                say(f"step {s['step_ms']:.0f} ms with the log" + (f", {s['plain_ms']:.0f} ms without "
                    f"({batch / s['plain_ms'] * 1000:.0f} images/s)" if "plain_ms" in s else "")
                    + f"; some oneDNN primitive running {s['inside_ms']:.0f} ms ({s['inside_ms'] / s['step_ms']:.0%}), "
                    f"primitive times sum to {s['sum_ms']:.0f} ms; "
                    f"{s['reorders']:.0f} reorders per step")
                say()
                say("| primitive | per step | ms | share of primitive time | src dtype | implementation |")
                say("| --- | --- | --- | --- | --- | --- |")
                for row in fmt_kinds(s):
                    say(row)
            f32, bf = result["float32"], result["mixed_bfloat16"]
            say()
            say(f"### {label}, batch {batch}: per layer, convolution ms per step (fwd + bwd data + bwd weights)")
            say()
            say("| layer | float32 ms | bfloat16 ms | speed-up |")
            say("| --- | --- | --- | --- |")
            for name in f32["layers"]:
                a, b = f32["layers"][name], bf["layers"].get(name, float("nan"))
                say(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
            conv = lambda s: sum(k["ms"] for kind, k in s["kinds"].items() if kind.startswith("convolution"))  # noqa: E731
            summary.append((label, batch, f32, bf, conv(f32), conv(bf)))
    if out and micro_only:
        out.write_text("\n".join(lines) + "\n")
    if micro_only:
        return
    say()
    say("## Summary: bfloat16 / float32")
    say()
    say("| configuration | batch | step speed-up (no log) | step speed-up (log) | convolutions speed-up | "
        "no-primitive ms f32 -> bf16 | no-primitive share f32 -> bf16 |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for label, batch, f32, bf, c32, cbf in summary:
        plain = f"{f32['plain_ms'] / bf['plain_ms']:.2f}x" if "plain_ms" in f32 else "-"
        o32, obf = f32["step_ms"] - f32["inside_ms"], bf["step_ms"] - bf["inside_ms"]
        say(f"| {label} | {batch} | {plain} | {f32['step_ms'] / bf['step_ms']:.2f}x | {c32 / cbf:.2f}x | "
            f"{o32:.0f} -> {obf:.0f} | {o32 / f32['step_ms']:.0%} -> {obf / bf['step_ms']:.0%} |")
    if out:
        out.write_text("\n".join(lines) + "\n")
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
