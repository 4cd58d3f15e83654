"""Export latency: batch-1 inference time of Keras vs ONNX Runtime vs LiteRT (TFLite) on this CPU.

Reads a registered version (``--model``, default ``cifarflow-cnn@champion``)
and the files ``cifarflow export`` wrote for it (``export/<name>/<version>/``,
with ``parity.json``). Every runtime gets the same ``--threads`` and the same
real test images, one image per call (raw 0..255 pixels, float32
(1, 32, 32, 3)); after ``--warmup`` calls, ``--calls`` calls are timed one by
one and the median, mean and 90th percentile are printed in milliseconds, with each
runtime's speed-ups over eager Keras and over Keras in a ``tf.function``
(median Keras / median runtime), the file sizes
and the test accuracies and parity figures measured by the export.

Keras is timed twice: ``keras`` is ``model(x, training=False)`` (an eager
direct call; ``model.predict`` adds more per-call setup), ``keras_graph`` the
same call traced once into a ``tf.function`` (TensorFlow graph execution, the
fairest Keras baseline for serving).

    python bench/export_latency.py --model cifarflow-cnn@champion --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import click  # noqa: E402


def timed(fn, images, warmup: int, calls: int) -> list[float]:
    """Per-call wall times (ms) of ``fn(image)`` over ``calls`` images after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(images[i % len(images)])
    out = []
    for i in range(calls):
        x = images[i % len(images)]
        start = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - start) * 1000)
    return out


@click.command()
@click.option("--model", default="cifarflow-cnn@champion", show_default=True, help="Registered version (NAME@ALIAS, NAME/VERSION).")
@click.option("--export-dir", default=None, help="Folder of the exported files (default export/<name>/<version>/).")
@click.option("--data", default=None, help="Test images (default: the training run's data source).")
@click.option("--calls", default=200, show_default=True)
@click.option("--warmup", default=30, show_default=True)
@click.option("--threads", default=os.cpu_count(), show_default=True, help="Intra-op threads for every runtime.")
def main(model: str, export_dir: str | None, data: str | None, calls: int, warmup: int, threads: int) -> None:
    import mlflow
    import numpy as np
    import onnxruntime as ort
    import tensorflow as tf

    from cifarflow.data import datasets as datamod
    from cifarflow.deploy import export
    from cifarflow.tracking import refs

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    ref = refs.resolve_version(model)
    folder = Path(export_dir or Path("export") / ref.name / ref.version)
    figures = json.loads((folder / "parity.json").read_text())
    run = mlflow.MlflowClient().get_run(ref.run_id)
    ds = datamod.load(data or run.data.params["data_source"])
    images = [ds.x_test[i:i + 1].astype(np.float32) for i in range(min(calls, len(ds.x_test)))]

    keras_model = refs.load_keras(ref.uri)
    graph = tf.function(lambda x: keras_model(x, training=False), input_signature=[tf.TensorSpec((1, 32, 32, 3))])
    runtimes = {"keras": lambda x: keras_model(x, training=False).numpy(),
                "keras_graph": lambda x: graph(x).numpy()}
    if (folder / "model.onnx").is_file():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        runtimes["onnx"] = lambda x: session.run(None, {name: x})[0]
    for kind in ("tflite_float32", "tflite_float16", "tflite_dynamic", "tflite_int8"):
        path = folder / export.artifact_name(kind)
        if not path.is_file():
            continue
        interp = export.tflite_interpreter(path, num_threads=threads)
        interp.allocate_tensors()  # the file's signature is (1, 32, 32, 3): batch 1 as converted
        inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

        def run_tflite(x, interp=interp, inp=inp, out=out):
            interp.set_tensor(inp, x)
            interp.invoke()
            return interp.get_tensor(out)

        runtimes[kind] = run_tflite

    # same answers first: a runtime that disagrees with Keras is not benchmarked blind
    probe = np.concatenate(images[:20])
    expect = keras_model(probe, training=False).numpy().argmax(1)
    for kind, fn in runtimes.items():
        got = np.array([fn(x)[0].argmax() for x in images[:20]])
        assert (got == expect).mean() >= 0.9, f"{kind} disagrees with Keras on the probe images"

    click.echo(f"{ref.name} v{ref.version} (run {ref.run_id}); {len(images)} test images, batch 1, "
               f"{threads} threads, {warmup} warm-up + {calls} timed calls each; {os.cpu_count()} CPUs")
    click.echo(f"load average before: {os.getloadavg()[0]:.1f} (other processes share these CPUs: the median is "
               "robust to that, the mean and p90 are not)")
    click.echo(f"{'runtime':<15} {'median ms':>10} {'mean ms':>8} {'p90 ms':>8} {'vs keras':>9} {'vs graph':>9} {'size KiB':>9} "
               f"{'test acc':>9} {'max|dp|':>9} {'top1 agr':>9}")
    keras_acc = next(iter(figures.values()))["keras_test_accuracy"] if figures else float("nan")
    medians = {}
    for kind, fn in runtimes.items():
        t = timed(fn, images, warmup, calls)
        medians[kind] = statistics.median(t)
        p90 = statistics.quantiles(t, n=10)[-1]
        f = figures.get(kind, {})
        size = f.get("size_bytes", 0) / 1024 if f else float("nan")
        acc = f.get("test_accuracy", keras_acc if kind.startswith("keras") else float("nan"))
        click.echo(f"{kind:<15} {medians[kind]:>10.3f} {statistics.fmean(t):>8.3f} {p90:>8.3f} {medians['keras'] / medians[kind]:>8.1f}x "
                   f"{medians.get('keras_graph', medians[kind]) / medians[kind]:>8.1f}x "
                   f"{size:>9.1f} {acc:>9.4f} {f.get('max_abs_diff', float('nan')):>9.2e} "
                   f"{f.get('top1_agreement', float('nan')):>9.4f}")


if __name__ == "__main__":
    main()
