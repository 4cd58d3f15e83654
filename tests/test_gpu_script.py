"""bench/gpu/run.sh (issue 29): the scripts parse, ``--plan`` lists the three steps with their time boxes,
the probe's epoch formula, airbench94's output parsing, and the summary of a tiny MLflow store.
The real ``--smoke`` run (minutes of JAX training) is not part of the suite: see bench/gpu/README.md."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "bench" / "gpu"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU / "run.sh"), *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=REPO)


@pytest.mark.parametrize("script", ["run.sh", "fetch_wheels.sh", "prepare.sh"])
def test_the_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_plan_lists_the_three_steps_with_their_time_boxes():
    proc = _run_sh("--plan")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "plan (full): deadline 540 s" in out
    assert re.search(r"^step 1 wrn: probe time box \d+ s", out, re.M)
    assert "cifarflow train wrn --epochs <probe> --set precision=mixed_bfloat16" in out
    assert re.search(r"training budget 300 s .*time box budget \+ \d+ s", out)
    assert re.search(r"^step 2 fast: time box \d+ s: cifarflow train fast", out, re.M)
    assert re.search(r"^step 2 airbench94 reference: time box \d+ s: bench/gpu/airbench_ref.py", out, re.M)
    assert re.search(r"^step 3 lite0: probe time box \d+ s", out, re.M)
    assert "cifarflow train efficientnet_lite0 --set resolution=224" in out
    assert re.search(r"training budget 120 s .*time box budget \+ \d+ s", out)
    assert "summary.md" in out


def test_smoke_plan_is_tiny_and_skips_airbench():
    proc = _run_sh("--smoke", "--plan", "--data", "somewhere/cifar10-jpeg.tar.gz", "--out", "/tmp/x")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "plan (smoke): deadline 290 s" in out  # under the 5 minutes the smoke run is allowed
    assert "somewhere/cifar10-jpeg.tar.gz (smoke: the first 100 train + 50 test images per class" in out
    assert "airbench94 reference: skipped (smoke)" in out
    assert "--set depth=10 --set width=1" in out and "--set resolution=32" in out
    for step in ("step 1 wrn", "step 2 fast", "step 3 lite0"):
        assert step in out


def test_only_and_bad_options():
    proc = _run_sh("--only", "fast", "--plan", "--wrn-budget", "10")
    assert proc.returncode == 0, proc.stderr
    assert "step 2 fast" in proc.stdout and "step 1 wrn" not in proc.stdout and "step 3 lite0" not in proc.stdout
    assert _run_sh("--only", "resnet", "--plan").returncode == 2
    bad = _run_sh("--bogus")
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


def test_out_defaults_to_the_tools_out_folder():
    import os

    proc = _run_sh("--plan", env={**os.environ, "OUT": "/somewhere/out"})
    assert "out  /somewhere/out (mlflow.db" in proc.stdout


def test_probe_epochs_fit_the_budget():
    probe = _module("probe")
    measured = {"compile_seconds": 30.0, "fixed_seconds": 10.0, "epoch_seconds": 12.0}
    assert probe.epochs_for(measured, 300) == 21  # (300 - 30 - 10) / 12 = 21.7
    assert probe.epochs_for(measured, 20) == 1  # never fewer than one epoch


def test_probe_epochs_for_reads_a_probe_file(tmp_path, capsys):
    probe = _module("probe")
    path = tmp_path / "probe.json"
    path.write_text("a log line\n" + json.dumps({"compile_seconds": 5, "fixed_seconds": 0, "epoch_seconds": 2.5}))
    assert probe.main(["epochs-for", str(path), "--budget", "30"]) == {"epochs": 10}
    assert capsys.readouterr().out.strip() == "10"


def test_airbench_total_time_is_read_from_its_last_table_row():
    ref = _module("airbench_ref")
    printed = """\
---------------------------------------------------------------------------------------
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
---------------------------------------------------------------------------------------
|       0  |      0  |      1.6128  |     0.4639  |   0.3872  |               |              0.9231  |
|          |   eval  |      0.7531  |     0.8379  |   0.9389  |       0.9412  |              3.4102  |
---------------------------------------------------------------------------------------
"""
    assert ref.last_total_time(printed) == pytest.approx(3.4102)
    assert ref.last_total_time("no table") is None


def test_summary_of_a_tiny_store(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.create_experiment("cifarflow/fake")
    ids = {}
    for step, acc, tta, ips, seconds in (("wrn", 0.91, 0.92, (900.0, 2000.0, 2100.0, 2200.0), 290.0),
                                         ("fast", 0.90, 0.907, (5000.0, 30000.0), 12.0)):
        run = client.create_run(exp)
        ids[step] = run.info.run_id
        for i, value in enumerate(ips):
            client.log_metric(run.info.run_id, "images_per_second", value, step=i)
        for key, value in (("test_accuracy", acc), ("test_accuracy_tta", tta), ("train_seconds", seconds)):
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    steps = tmp_path / "steps.jsonl"
    steps.write_text("\n".join(json.dumps(s) for s in (
        {"step": "wrn", "status": "ok", "run_id": ids["wrn"], "wall_s": 330, "note": "budget 300 s scaled to 250 s",
         "budget_s": 250, "planned_epochs": 4, "probe": {"epoch_seconds": 55.0, "compile_seconds": 30.0}},
        {"step": "fast", "status": "ok", "run_id": ids["fast"], "wall_s": 40},
        {"step": "airbench94", "status": "ok", "wall_s": 25,
         "runs": [{"run": 0, "tta_accuracy": 0.9077, "total_time_seconds": 4.0, "wall_s": 6.5},
                  {"run": 1, "tta_accuracy": 0.9081, "total_time_seconds": 3.0, "wall_s": 4.1}]},
        {"step": "lite0", "status": "timeout", "wall_s": 200},
    )) + "\n")
    out = tmp_path / "summary.md"
    summary = _module("summary")
    assert summary.main(["--store", str(store), "--steps", str(steps), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"| wrn | {ids['wrn']} | 0.9100 | 0.9200 | 2100 | 290.0 | 4 | 330 | ok |" in text  # median after epoch 0
    assert f"| fast | {ids['fast']} | 0.9000 | 0.9070 | 30000 | 12.0 | 2 | 40 | ok |" in text
    assert "| airbench94 |  |  | 0.9081 |  | 3.0 |  | 25 | ok |" in text  # its warm run
    assert "| lite0 |  |  |  |  |  |  | 200 | timeout |" in text
    assert "fast vs airbench94 (cold run 0): train_seconds 12.0 s / 4.00 s = 3.00x" in text
    assert "fast vs airbench94 (warm run 1): train_seconds 12.0 s / 3.00 s = 4.00x" in text
    assert "wrn: budget 300 s scaled to 250 s" in text
    assert "wrn: budget 250 s -> 4 epochs from the probe (55.00 s per epoch projected, 30.0 s compiling); " \
           "train_seconds 290.0" in text
    assert "status: 3/4 steps ok or skipped as planned; not ok: lite0" in text
