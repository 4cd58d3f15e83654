"""``bench/run.py --smoke`` runs every section end to end on tiny data and writes each into RESULTS.md;
``--fast-run``/``--short-run`` read a finished run's figures from the MLflow store instead of training (the
smoke runs in this process; the script's own process, exit codes and messages: the user-error test);
``bench/bf16_profile.py`` parses oneDNN's verbose log."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADINGS = ("## Matmul peak", "## Training speed", "## Overheads", "## Export", "## Time to accuracy")


def bench(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=1500)


@pytest.fixture
def bench_run(monkeypatch):
    """``bench/run.py`` imported in this process (its click command is ``bench_run.main``)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import run

    return run


@pytest.mark.slow
def test_smoke_run_of_the_speed_sections_writes_peak_speed_and_overheads(train_data, tmp_path, monkeypatch,
                                                                         bench_run):
    """The speed half of ``--smoke`` (its other half: the test below; a section reads nothing of another but the
    matmul peak, which speed needs), in this process: the script's command-line wiring is the test below's."""
    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)

    out = tmp_path / "RESULTS.md"
    result = CliRunner().invoke(bench_run.main, ["--data", str(train_data), "--smoke", "--no-xla", "--sections",
                                                 "peak,speed,overhead", "--out", str(out)])  # XLA: minutes
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    text = out.read_text()
    for heading in HEADINGS[:3]:
        assert heading in text, heading
    for heading in HEADINGS[3:]:
        assert heading not in text, heading
    speed = re.findall(r"^\| (fast|cnn_small) \| 16 \| (float32|mixed_bfloat16) \| (True|False) \| (\d+) \|", text, re.M)
    assert len(speed) == 4  # 2 recipes x 2 dtypes, images/s measured
    assert text.count("bfloat16 speed-up") == 2 and "XLA speed-up not measured" in text
    assert re.search(r"pipeline: .* = \d+\.\d{3}", text) and re.search(r"platform: .* = \d+\.\d{3}", text)


@pytest.mark.slow
def test_smoke_run_of_export_and_accuracy_then_reads_runs_from_mlflow(train_data, tmp_path, monkeypatch,
                                                                      bench_run):
    """In this process, as the test above (the TFLite conversion still runs in its own process)."""
    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)

    out = tmp_path / "RESULTS.md"
    result = CliRunner().invoke(bench_run.main, ["--data", str(train_data), "--smoke", "--sections", "export,accuracy",
                                                 "--out", str(out)])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    text = out.read_text()
    for heading in HEADINGS[3:]:
        assert heading in text, heading
    for runtime in ("keras (tf.function)", "onnx runtime", "litert float32", "litert int8"):
        assert re.search(rf"^\| {re.escape(runtime)} \| \d+\.\d+ \|", text, re.M), runtime
    run_id = re.search(r"^\| short \| 1 \| [01]\.\d{4} \| [01]\.\d{4} \| \d+ \| \d+ \| \d+ \| `([0-9a-f]{32})` \|", text, re.M)
    assert run_id, text[-1500:]  # trained here (no run ids): a 1-epoch fast run, with TTA

    # the same run read back from the store: its figures, its id, nothing trained
    monkeypatch.setattr(bench_run, "train_fast", lambda *a, **k: pytest.fail("trained although run ids were given"))
    again = tmp_path / "AGAIN.md"
    result = CliRunner().invoke(bench_run.main, ["--data", str(train_data), "--smoke", "--sections", "accuracy",
                                                 "--fast-run", run_id.group(1), "--short-run", run_id.group(1),
                                                 "--out", str(again)])
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^\| (full|short) \| 1 \| ([01]\.\d{4}) \| ([01]\.\d{4}) \| \d+ \| \d+ \| \d+ \| `(\w+)` \|",
                      again.read_text(), re.M)
    assert [r[0] for r in rows] == ["full", "short"] and {r[3] for r in rows} == {run_id.group(1)}
    assert rows[0][1:3] == re.search(r"^\| short \| 1 \| ([01]\.\d{4}) \| ([01]\.\d{4})", text, re.M).groups()
    assert "Read from the MLflow store" in again.read_text() and "## Export" not in again.read_text()


def test_unknown_run_id_and_section_are_user_errors(tmp_path):
    proc = bench(["--sections", "accuracy", "--fast-run", "0" * 32, "--out", str(tmp_path / "R.md")], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "0" * 32 in proc.stderr
    proc = bench(["--sections", "nonsense", "--out", str(tmp_path / "R.md")], tmp_path)
    assert proc.returncode == 2 and "nonsense" in proc.stderr and "Traceback" not in proc.stderr


def test_bf16_profile_parses_the_verbose_log_into_kinds_layers_and_busy_time():
    sys.path.insert(0, str(REPO / "bench"))
    import bf16_profile as b

    def line(stamp, kind, impl, prop, src, desc, ms):
        return (f"onednn_verbose,v1,{stamp},primitive,exec,cpu,{kind},{impl},{prop},src:{src}::blocked:acdb::f0 "
                f"dst:{src}::blocked:acdb::f0,attr-scratchpad:user,alg:x,{desc},{ms}")

    conv = "mb8_ic64oc256_ih15oh15kh3sh1dh0ph1_iw15ow15kw3sw1dw0pw1"
    log = [
        "onednn_verbose,v1,info,oneDNN v3.7.3 (commit N/A)",
        line(999.0, "convolution", "brg_conv_fwd:avx512_core_bf16", "forward_training", "bf16", conv, 50.0),  # before
        line(1000.0, "convolution", "brg_conv_fwd:avx512_core_bf16", "forward_training", "bf16", conv, 4.0),
        line(1002.0, "convolution", "jit_bf16:avx512_core_bf16", "backward_weights", "bf16", conv, 4.0),  # overlaps
        line(1010.0, "reorder", "jit:uni", "undef", "bf16", "256x64x3x3", 1.0),
        line(1030.0, "reorder", "jit:uni", "undef", "bf16", "256x64x3x3", 1.0),
        line(2001.0, "convolution", "brg_conv_fwd:avx512_core_bf16", "forward_training", "bf16", conv, 9.0),  # after
    ]
    prims = b.parse(log, 1000.0, 2000.0)
    assert [p["kind"] for p in prims] == ["convolution", "convolution", "reorder", "reorder"]
    assert b.busy_ms(prims) == pytest.approx(6.0 + 1.0 + 1.0)  # [1000, 1006] + two reorders; the overlap once
    marks = {"start": 1000.0, "end": 1040.0, "convs": [{"name": "block2_conv1", "ic": 64, "oc": 256, "ih": 15, "kh": 3}]}
    s = b.summarize(prims, marks, steps=2)
    assert s["step_ms"] == pytest.approx(20.0) and s["inside_ms"] == pytest.approx(4.0)
    assert s["layers"] == {"block2_conv1": pytest.approx(4.0)}  # (4 + 4) ms over 2 steps
    assert s["reorders"] == 1 and s["kinds"]["convolution backward_weights"]["impl"] == {"jit_bf16:avx512_core_bf16"}
    assert s["kinds"]["convolution forward_training"]["dtype"] == {"bf16"}


@pytest.mark.slow
def test_backends_bench_prints_both_backends_and_their_ratio(train_data, tmp_path):
    from test_backends import TEST_XLA_FLAGS  # tiny programs: XLA's compile costs, not the run

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), XLA_FLAGS=TEST_XLA_FLAGS)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "backends.py"), "--data", str(train_data), "--smoke",
                           "--recipes", "cnn_small"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = re.search(r"^\| cnn_small \| 16 \| \w+ \| (\d+) \| (\d+) \| ([\d.]+) \| (\d+) \| (\d+) \| ([\d.]+) \|$",
                    proc.stdout, re.M)
    assert row, proc.stdout
    tf_model, jax_model, ratio = int(row[1]), int(row[2]), float(row[3])
    assert tf_model > 0 and jax_model > 0 and ratio == pytest.approx(jax_model / tf_model, abs=0.02 + 1 / tf_model)
    assert re.search(r"TensorFlow 2\.\d+\.\d+, JAX 0\.\d+\.\d+\.", proc.stdout)


def test_epoch_clock_times_an_epoch_with_and_without_what_follows_it(monkeypatch, bench_run):
    """The pipeline overhead times each fit from its epoch's start to its end (``inside``), leaving out
    ``fit``'s set-up and tear-down; the platform overhead from one epoch's start to the next (``seconds``)."""
    clock = bench_run.EpochClock.make()
    ticks = iter([10.0, 12.5, 20.0, 23.0, 30.0])  # begin 0, end 0, begin 1, end 1, train end
    monkeypatch.setattr(bench_run.time, "perf_counter", lambda: next(ticks, 99.0))
    clock.on_epoch_begin(0), clock.on_epoch_end(0), clock.on_epoch_begin(1), clock.on_epoch_end(1)
    clock.on_train_end()
    assert clock.inside(0) == 2.5 and clock.seconds(0) == 10.0
    assert clock.inside(1) == 3.0 and clock.seconds(1) == 10.0


def test_platform_overhead_takes_the_median_epoch_so_a_stall_in_one_arm_does_not_decide_it(monkeypatch, bench_run):
    """An epoch of 4 steps took 14.6 s or, at random, 20.5 s in either arm on the 2-core host; a sum over
    two epochs caught one stall in the platform arm and gave 0.873. The median of epochs 2.. ignores it."""
    def clock(epoch_seconds):
        c = bench_run.EpochClock.make()
        ticks = iter(itertools.accumulate([0.0, *epoch_seconds]))
        monkeypatch.setattr(bench_run.time, "perf_counter", lambda: next(ticks))
        for e in range(len(epoch_seconds)):
            c.on_epoch_begin(e)
        c.on_train_end()
        return c

    platform = [clock([40.0, 14.6, 20.5, 14.7, 14.6, 14.8]), clock([40.0, 14.7, 14.6, 20.5, 14.6, 14.7])]
    bare = [clock([40.0, 14.6, 14.7, 14.6, 14.6, 14.7]), clock([40.0, 14.6, 14.6, 14.7, 14.5, 14.6])]
    per_second = bench_run.median_epoch_images_per_second
    ratio = per_second(4096, platform) / per_second(4096, bare)
    assert ratio == pytest.approx(14.6 / 14.7)


def test_quick_without_run_ids_trains_one_epoch_on_10000_images_and_an_explicit_limit_wins(
        monkeypatch, tmp_path, bench_run):
    """``--quick`` without ``--fast-run`` trains one epoch of ``fast`` on 10,000 images (the whole set made
    the quick run 17.5 min on the slower 2-core host, over its 15); ``--limit`` still wins."""
    from click.testing import CliRunner

    calls = []
    monkeypatch.setattr(bench_run, "train_fast", lambda data, epochs, limit=None: calls.append((epochs, limit)) or "r1")
    monkeypatch.setattr(bench_run, "run_figures", lambda run_id: {
        "run_id": run_id, "recipe": "fast", "epochs": 1, "test_accuracy": 0.5, "test_accuracy_tta": 0.51,
        "train_seconds": 100.0, "wall_seconds": 150.0, "images_per_second": 250.0})
    out = tmp_path / "R.md"
    for extra, expected in (([], (1, 10000)), (["--limit", "300"], (1, 300))):
        result = CliRunner().invoke(bench_run.main, ["--quick", "--sections", "accuracy", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert calls[-1] == expected
        assert f"on {expected[1]:,} training images" in out.read_text()
