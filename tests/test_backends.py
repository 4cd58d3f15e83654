"""Keras backends: the array input pipeline (JAX, PyTorch), training and evaluating on JAX with TensorFlow
unimportable, and data parallelism on two virtual devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cifarflow import config
from cifarflow.data import arrays, pipeline

# A sys.meta_path finder that makes `import tensorflow` (and its submodules) raise ImportError, loaded first
# by every Python process started with this folder first on PYTHONPATH. It records which file asked, so a
# test can tell cifarflow's imports from libraries' optional probes. Not `sys.modules["tensorflow"] = None`:
# Keras reads `"tensorflow" in sys.modules` as "TensorFlow is in use" and its layers then demand it.
BLOCK_TENSORFLOW = '''
import os, sys

class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" and not name.startswith("tensorflow."):
            return None
        frame = sys._getframe(1)
        while frame and (frame.f_code.co_filename.startswith("<frozen") or "importlib" in frame.f_code.co_filename):
            frame = frame.f_back
        with open(os.environ["CIFARFLOW_TF_ATTEMPTS"], "a") as log:
            log.write(f"{name} {frame.f_code.co_filename if frame else '?'}\\n")
        raise ImportError(f"{name} is blocked by the test (TensorFlow is not installed)")

sys.meta_path.insert(0, _NoTensorFlow())
'''


# XLA:CPU's LLVM optimisation off for the tests' tiny programs: compiling, not running them, is what costs (a
# cold tiny cnn_small run 28.4 s -> 16.8 s, the same metrics); every JAX process of a comparison gets it
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def jax_env(tmp_path: Path, block_tensorflow: bool = True, **extra) -> dict[str, str]:
    """The test's environment for a subprocess on the JAX backend, with ``import tensorflow`` failing; XLA
    flags in ``extra`` are added to :data:`TEST_XLA_FLAGS`."""
    flags = " ".join(f for f in (TEST_XLA_FLAGS, extra.pop("XLA_FLAGS", "")) if f)
    env = {**os.environ, "KERAS_BACKEND": "jax", **extra, "XLA_FLAGS": flags}
    if block_tensorflow:
        hook = tmp_path / "no_tensorflow"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
        env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
        env["CIFARFLOW_TF_ATTEMPTS"] = str(tmp_path / "tf_attempts.log")
    return env


def run_python(code: str, env: dict, timeout: float = 600) -> dict:
    """Run ``code`` in a new interpreter; return the JSON object it prints last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _arrays(n=40, classes=4, size=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8), np.arange(n) % classes


def test_array_batches_keep_the_make_dataset_contract():
    x, y = _arrays()
    ds = arrays.ArrayBatches(x, y, 4, 16, training=True, seed=1)
    batches = [ds[i] for i in range(len(ds))]
    assert [b[0].shape for b in batches] == [(16, 32, 32, 3), (16, 32, 32, 3), (8, 32, 32, 3)]
    assert all(b[0].dtype == np.float32 and b[1].dtype == np.float32 for b in batches)
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(labels.sum(1), 1.0)
    # an epoch is every image once, with its label, in a seeded order that changes with the epoch
    order = [int(np.flatnonzero((x.astype(np.float32) == img).all(axis=(1, 2, 3)))[0]) for img in images]
    assert sorted(order) == list(range(40)) and order != list(range(40))
    np.testing.assert_array_equal(labels.argmax(1), y[order])
    ds.epoch = 1
    assert not np.array_equal(ds[0][0], batches[0][0])
    evaluation = arrays.ArrayBatches(x, y, 4, 40, training=False)
    np.testing.assert_array_equal(evaluation[0][0], x.astype(np.float32))
    with pytest.raises(IndexError):
        evaluation[1]


def test_array_batches_are_a_function_of_seed_epoch_and_index():
    """What a resumed run relies on: batch i of epoch e is the same whatever was drawn before it."""
    x, y = _arrays()
    cfg = config.resolve("cnn_small", {"mixup_alpha": 0.4})

    def make(seed=7):
        return arrays.ArrayBatches(x, y, 4, 16, training=True, augment=pipeline.augmentation(cfg, seed=seed),
                                   mix=pipeline.mixing(cfg, seed=seed), seed=seed)

    walked = make()
    for epoch in range(3):  # an uninterrupted run: every batch of epochs 0..2 in order
        walked.epoch = epoch
        seen = [walked[i] for i in range(len(walked))]
    resumed = make()
    resumed.epoch = 2  # a run resumed at epoch 2, drawing its batches in another order
    for i in reversed(range(len(resumed))):
        np.testing.assert_array_equal(np.asarray(resumed[i][0]), np.asarray(seen[i][0]))
        np.testing.assert_array_equal(np.asarray(resumed[i][1]), np.asarray(seen[i][1]))
    assert not np.allclose(np.asarray(seen[0][1]).max(1), 1.0)  # MixUp did mix the labels
    assert not np.array_equal(np.asarray(make(seed=8)[0][0]), np.asarray(make()[0][0]))


def test_alternating_flip_in_array_batches():
    x, y = _arrays(8)
    flip = pipeline.AlternatingFlip(seed=3)
    prepared = flip.prepare(x)
    ds = arrays.ArrayBatches(prepared, np.arange(8), 8, 8, training=True, alternate=flip, clock=flip)
    for epoch in range(3):
        ds.epoch = epoch
        images, labels = ds[0]
        expected = prepared[labels.argmax(1)].astype(np.float32)
        np.testing.assert_array_equal(images, expected[:, :, ::-1] if epoch % 2 else expected)
    assert flip._epoch is None  # the clock made no tf.Variable off tf.data


def test_make_dataset_picks_the_pipeline_of_the_backend():
    x, y = _arrays()
    assert not isinstance(pipeline.make_dataset(x, y, 4, 16, training=True), arrays.ArrayBatches)  # TF here
    out = run_python("""
        import numpy as np
        from cifarflow.data import arrays, pipeline
        x = np.zeros((10, 32, 32, 3), np.uint8); y = np.arange(10) % 2
        clock = pipeline.EpochClock()
        ds = pipeline.make_dataset(x, y, 2, 4, training=True, clock=clock)
        clock.on_epoch_begin(3)
        print('{"arrays": %s, "epoch": %d}' % (str(isinstance(ds, arrays.ArrayBatches)).lower(), ds.epoch))
    """, {**os.environ, "KERAS_BACKEND": "jax"})
    assert out == {"arrays": True, "epoch": 3}


@pytest.mark.slow
def test_train_and_evaluate_on_jax_without_tensorflow(tmp_path):
    """`cifarflow train resnet20` (residual blocks, BatchNorm, MixUp, alternating flip, flip TTA) then
    `cifarflow evaluate` and a pyfunc reload under KERAS_BACKEND=jax, in a process where `import tensorflow`
    raises ImportError: nothing of cifarflow asks for TensorFlow."""
    import conftest
    import mlflow

    conftest.write_class_folders(tmp_path / "data", per_class=(16, 4))
    env = jax_env(tmp_path)
    # one interpreter for the three commands (a JAX + Keras start-up and its compiles each, otherwise)
    out = run_python(f"""
        import contextlib, io, json, sys
        import numpy as np
        try:
            import tensorflow
            raise SystemExit("the TensorFlow block is not in effect")
        except ImportError:
            pass
        from cifarflow.cli import main
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            main(["train", "resnet20", "--quiet", "--data", {str(tmp_path / "data")!r}, "--epochs", "2",
                  *[f"--set={{kv}}" for kv in ("batch_size=16", "val_fraction=0.25", "warmup_epochs=0",
                                               "mixup_alpha=0.2", "flip=alternate", "tta=flip")]])
        model_uri = printed.getvalue().strip().rsplit("model=", 1)[1]
        main(["evaluate", model_uri, "--fgsm-images", "4"])
        import mlflow
        model = mlflow.pyfunc.load_model(model_uri)
        probs = model.predict(np.zeros((3, 32, 32, 3), np.float32))
        print(json.dumps({{"model_uri": model_uri, "shape": list(probs.shape), "sums": probs.sum(1).tolist(),
                          "tensorflow_loaded": "tensorflow" in sys.modules}}))
    """, env)
    model_uri = out["model_uri"]
    assert out["shape"] == [3, 3] and np.allclose(out["sums"], 1.0, atol=1e-5)
    assert out["tensorflow_loaded"] is False
    attempts = (tmp_path / "tf_attempts.log").read_text().splitlines() if (tmp_path / "tf_attempts.log").exists() else []
    assert not [a for a in attempts if "cifarflow" in a.split(" ", 1)[1]], attempts  # only libraries' probes

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    train_run = next(r for r in runs if r.data.tags.get("cifarflow.model_uri") == model_uri
                     and "cifarflow.source_run_id" not in r.data.tags)
    assert train_run.data.tags["cifarflow.keras_backend"] == "jax" and "cifarflow.jax_version" in train_run.data.tags
    assert {"test_accuracy", "test_accuracy_tta", "val_accuracy"} <= set(train_run.data.metrics)
    evaluation = next(r for r in runs if r.data.tags.get("cifarflow.source_run_id") == train_run.info.run_id)
    assert evaluation.data.metrics["test_accuracy"] == train_run.data.metrics["test_accuracy"]


# The data-parallel comparisons train at 0.01, not the recipe's 0.1: at 0.1 six SGD steps on 36 images amplify
# the all-reduce's rounding (another summation order) into 0.2 % of train loss and 2.5 % of val loss (a TF
# failure on a fresh install, deterministic there); at 0.01 data parallel matches one device to 4e-6, while
# per-replica BatchNorm statistics (the bug the TF test guards against) still move train loss by 6 %.
STABLE_LEARNING_RATE = 0.01

DATA_PARALLEL_RUNS = """
import json
import mlflow
from cifarflow import config
from cifarflow.training.trainer import train
out = {}
for distribution in ("none", "data_parallel"):
    cfg = config.resolve("cnn_small", {"data": DATA, "epochs": 2, "batch_size": 16, "width": 0.125,
                                       "dense_units": 16, "val_fraction": 0.25, "warmup_epochs": 0,
                                       "learning_rate": STABLE_LEARNING_RATE, "distribution": distribution})
    r = train(cfg, quiet=True, log_model=False)
    run = mlflow.get_run(r.run_id)
    out[distribution] = {"tag": run.data.tags["cifarflow.distribution"], "train_loss": run.data.metrics["train_loss"],
                         "val_loss": run.data.metrics["val_loss"], "test_loss": r.metrics["test_loss"],
                         "test_accuracy": r.metrics["test_accuracy"]}
print(json.dumps(out))
"""


def _data_parallel_runs(folder, env, prelude="", **extra):
    import conftest

    conftest.write_class_folders(folder / "data", per_class=(16, 4))  # 36 training images: batches 16, 16, 4
    settings = "".join(f" {k!r}: {v!r}," for k, v in extra.items())
    code = DATA_PARALLEL_RUNS.replace('"epochs": 2,', '"epochs": 2,' + settings)
    return run_python(prelude + f"DATA = {str(folder / 'data')!r}\nSTABLE_LEARNING_RATE = {STABLE_LEARNING_RATE}\n"
                      + code, env)


# the settings of the JAX runs: the one-device run of the two-virtual-device test is also the reference the
# two-process test compares with (the same data, seed and global batch), so it is trained once for both
JAX_RUN_SETTINGS = {"mixup_alpha": 0.2, "flip": "alternate"}


@pytest.fixture(scope="module")
def jax_one_and_two_devices(tmp_path_factory):
    """cnn_small trained on JAX with one device and with keras.distribution.DataParallel over two virtual CPU
    devices, in one TensorFlow-blocked interpreter: ``{"none": {...}, "data_parallel": {...}}``."""
    folder = tmp_path_factory.mktemp("jax_devices")
    with pytest.MonkeyPatch.context() as mp:
        import conftest

        conftest.isolate(mp, folder)
        return _data_parallel_runs(folder, jax_env(folder, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                                   **JAX_RUN_SETTINGS)


@pytest.mark.slow
def test_data_parallel_on_two_jax_devices_matches_one_device(jax_one_and_two_devices):
    """The same global batch on two virtual CPU devices (keras.distribution.DataParallel), with MixUp and the
    alternating flip: the same training."""
    one, two = jax_one_and_two_devices["none"], jax_one_and_two_devices["data_parallel"]
    assert (one["tag"], two["tag"]) == ("none", "data_parallel:2")
    for key in ("train_loss", "val_loss", "test_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-3), (key, one, two)
    assert two["test_accuracy"] == one["test_accuracy"]


@pytest.mark.slow
def test_data_parallel_on_two_tensorflow_cpus_matches_one_device(tmp_path):
    """tf.distribute.MirroredStrategy over two logical CPUs, the same global batch; BatchNormalization
    synchronized across the replicas while training (Placement.adapt), so it trains as one device. Without
    dropout: each replica draws its own dropout masks, a different (equally valid) random draw."""
    prelude = ("import tensorflow as tf\n"
               "cpu = tf.config.list_physical_devices('CPU')[0]\n"
               "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n")
    out = _data_parallel_runs(tmp_path, {**os.environ, "KERAS_BACKEND": "tensorflow"}, prelude, dropout=0.0)
    one, two = out["none"], out["data_parallel"]
    assert (one["tag"], two["tag"]) == ("none", "data_parallel:2")
    for key in ("train_loss", "val_loss", "test_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-3), (key, one, two)  # measured: 4e-6; unsynchronized 6e-2
    assert two["test_accuracy"] == one["test_accuracy"]


def test_distribution_auto_is_one_device_without_accelerators_and_batch_must_split(monkeypatch):
    from cifarflow.errors import CifarflowError
    from cifarflow.training import distribute

    assert distribute.placement(config.resolve("cnn_small")).kind == "none"  # auto on this CPU
    monkeypatch.setattr(distribute, "accelerators", lambda: ["gpu:0", "gpu:1"])
    assert distribute.placement(config.resolve("cnn_small")).tag == "data_parallel:2"
    monkeypatch.setattr(distribute.keras.backend, "backend", lambda: "jax")
    with pytest.raises(CifarflowError, match="multiple of 2"):
        distribute.placement(config.resolve("cnn_small", {"batch_size": 15}))


def test_a_missing_backend_library_is_one_line_before_keras_imports(monkeypatch, capsys):
    import importlib.util

    from cifarflow.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a))
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with pytest.raises(SystemExit) as e:
        main(["train", "cnn_small", "--epochs", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: the Keras backend is jax but jax is not installed (pip install -e '.[jax]'")


def test_export_says_it_needs_tensorflow(monkeypatch):
    import importlib.util

    from cifarflow.deploy import export
    from cifarflow.errors import CifarflowError

    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(CifarflowError, match="runs on the TensorFlow Keras backend, not jax .*KERAS_BACKEND=tensorflow"):
        export.export("models:/m-x", ["onnx"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(CifarflowError, match=r"needs TensorFlow, which is not installed .*pip install -e '.\[tensorflow\]'"):
        export.export("models:/m-x", ["onnx"])


@pytest.mark.slow
def test_fast_recipe_optimizer_rules_on_jax():
    """The `fast` recipe's optimizer rules (per-variable learning rates, freeze_after, lookahead EMA, the
    triangular schedule) pass their own tests on JAX too (the Keras variables are read through ``.value``,
    which JAX's stateless step needs). The alternating-flip test overrides a TensorFlow-style train_step."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                           str(Path(__file__).with_name("test_fast_training.py")),
                           "-k", "not alternating_flip_flips_every_image"],
                          capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": TEST_XLA_FLAGS},
                          timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
def test_two_processes_on_localhost_train_one_run_like_one_process(tmp_path, jax_one_and_two_devices):
    """JAX multi-process data parallelism (Keras' KERAS_DISTRIBUTION_* variables, Gloo on CPU): two
    `cifarflow train` processes on 127.0.0.1, one CPU device each, train the run one process trains
    alone with the same global batch (the one-device run of ``jax_one_and_two_devices``: the same data,
    seed and settings); only process 0 records it."""
    import conftest
    import mlflow

    conftest.write_class_folders(tmp_path / "data", per_class=(16, 4))
    args = [os.path.join(os.path.dirname(sys.executable), "cifarflow"), "train", "cnn_small", "--quiet",
            "--data", str(tmp_path / "data"), "--epochs", "2",
            *[f"--set={kv}" for kv in ("batch_size=16", "width=0.125", "dense_units=16", "val_fraction=0.25",
                                       "warmup_epochs=0", f"learning_rate={STABLE_LEARNING_RATE}",
                                       *(f"{k}={v}" for k, v in JAX_RUN_SETTINGS.items()))]]
    env = jax_env(tmp_path)
    port = conftest.free_port()
    workers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
        **env, "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": str(i)}) for i in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-3000:] for o in outs]
    assert outs[1][0].strip().splitlines()[-1] == "process 1 of 2: done (process 0 records the run)"  # after Gloo's

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1  # process 0's: process 1 recorded nothing here
    one, two = jax_one_and_two_devices["none"], runs[0]
    assert two.data.tags["cifarflow.distribution"] == "data_parallel:2:processes=2"
    for key in ("train_loss", "val_loss", "test_loss"):
        assert two.data.metrics[key] == pytest.approx(one[key], rel=1e-3), key
    assert two.data.metrics["test_accuracy"] == one["test_accuracy"]
    assert two.data.tags["cifarflow.model_uri"].startswith("models:/m-")


def test_several_processes_need_jax_and_addresses(monkeypatch):
    from cifarflow.errors import CifarflowError
    from cifarflow.training import distribute

    monkeypatch.setattr(distribute, "_processes", None)
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    with pytest.raises(CifarflowError, match="needs the JAX backend, not tensorflow .*KERAS_BACKEND=jax"):
        distribute.join_processes()
    monkeypatch.setattr(distribute.keras.backend, "backend", lambda: "jax")
    with pytest.raises(CifarflowError, match="without KERAS_DISTRIBUTION_JOB_ADDRESSES"):
        distribute.join_processes()
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "two")
    with pytest.raises(CifarflowError, match="must be whole numbers"):
        distribute.join_processes()
    monkeypatch.delenv("KERAS_DISTRIBUTION_NUM_PROCESSES")
    assert distribute.join_processes() == (0, 1)
