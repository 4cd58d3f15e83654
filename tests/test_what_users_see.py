"""What a user sees from real `cifarflow` processes: piped output without terminal control codes, words while
something slow runs, quiet libraries, one run-name rule, runs and experiments that explain themselves, --help
with recipes and shell completion of recipe names (issue 16)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from clirun import in_process
from conftest import REPO, isolate, write_class_folders

TINY = ["--set", "width=0.125", "--set", "dense_units=16", "--set", "batch_size=16", "--set", "warmup_epochs=0"]
# what library chatter looks like on stderr; none of it may reach the user
NOISE = ("Creating a new experiment", "oneDNN", "absl::InitializeLog", "cudart_stub", "cuInit", "retracing",
         "UserWarning", "FutureWarning", "XNNPACK", "use_unbounded_threadpool", "Downloading artifacts")


def cifarflow(*args: str, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run the installed `cifarflow` command as a user would, output piped (not a terminal)."""
    exe = os.path.join(os.path.dirname(sys.executable), "cifarflow")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def piped_train(tmp_path_factory):
    """One `cifarflow train cnn_small --epochs 2` with stdout and stderr piped; returns (folder, process, run)."""
    root = tmp_path_factory.mktemp("piped_train")
    write_class_folders(root / "data", per_class=(24, 6))
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        mp.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")  # what a user gets: on by default
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a sample within this short run
        proc = cifarflow("train", "cnn_small", "--data", str(root / "data"), "--epochs", "2", *TINY, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("cifarflow/cnn_small")
        run = client.search_runs([exp.experiment_id])[0]
        return root, proc, run, client, exp


@pytest.mark.slow
def test_piped_training_prints_one_line_per_epoch_without_control_codes(piped_train):
    _, proc, run, _, _ = piped_train
    for stream in (proc.stdout, proc.stderr):
        assert "\x1b" not in stream and "\r" not in stream and "\b" not in stream, repr(stream[:500])
    lines = proc.stdout.splitlines()
    epochs = [i for i, line in enumerate(lines) if re.fullmatch(r"Epoch \d+/2", line)]
    assert len(epochs) == 2
    for i in epochs:  # Keras' verbose=2 line: steps, time, metrics
        assert re.match(r"\s*\d+/\d+ - \d+s - .*accuracy: [\d.]+ .*val_accuracy: [\d.]+", lines[i + 1]), lines[i + 1]
    assert lines[-1].startswith(f"run {run.info.run_id}: test_accuracy=")


@pytest.mark.slow
def test_training_says_what_it_does_before_and_after_the_epochs(piped_train):
    _, proc, _, _, _ = piped_train
    said = proc.stdout.splitlines()  # beside the epoch lines; stderr is for errors
    first_epoch = said.index("Epoch 1/2")
    assert said[0].startswith("loading data") and first_epoch > 0, proc.stdout
    after = said[said.index("Epoch 2/2") + 2:]
    assert after[0].startswith("testing on 18 images"), proc.stdout
    assert after[1].startswith("logging") and "model" in after[1], proc.stdout
    assert proc.stderr == "", proc.stderr


@pytest.mark.slow
def test_library_chatter_stays_out_of_the_terminal(piped_train):
    _, proc, _, _, _ = piped_train
    for noise in NOISE:
        assert noise not in proc.stderr + proc.stdout, f"{noise!r} leaked:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_one_run_name_rule_for_the_cli_and_the_python_api(piped_train, trained):
    """The CLI names its run by the rule; the Python API (the session's `trained` run) by the same rule."""
    from cifarflow import config
    from cifarflow.tracking import run_name

    root, _, run, _, _ = piped_train
    assert run.info.run_name == "cnn_small-epochs2-batch_size16-warmup_epochs0.0-width0.125-dense_units16"
    assert run_name(config.resolve("cnn_small", {"data": "elsewhere", "epochs": 2, "width": 0.125, "dense_units": 16,
                                                 "batch_size": 16, "warmup_epochs": 0})) == run.info.run_name
    api = MlflowClient().get_run(trained.run_id).info.run_name
    assert api == run_name(config.resolve("cnn_small", {"width": 0.125, "dense_units": 16, "batch_size": 16,
                                                        "val_fraction": 0.25, "warmup_epochs": 0, "epochs": 1}))
    assert api.startswith("cnn_small-") and "epochs1" in api


@pytest.mark.slow
def test_the_run_explains_itself(piped_train):
    """Description, dataset inputs (train/validation/test), param counts, system metrics, experiment description."""
    _, _, run, client, exp = piped_train
    note = run.data.tags["mlflow.note.content"]
    assert "cnn_small" in note and "2 epochs" in note and "\n" not in note.strip()
    metrics = run.data.metrics
    assert "param_count" in metrics and "trainable_param_count" in metrics
    assert "params" not in metrics and "trainable_params" not in metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
    sha = run.data.tags["cifarflow.dataset_sha256"]
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    for context, dataset in inputs.items():
        assert sha.startswith(dataset.digest) and len(dataset.digest) >= 12
        assert context in dataset.name and dataset.source
    assert "cnn_small" in exp.tags["mlflow.note.content"] and exp.tags["cifarflow.recipe"] == "cnn_small"


def test_data_info_writes_its_grid_only_where_out_says(folder_data, tmp_path, monkeypatch, capfd):
    """In this process (the working directory is what matters, not a new interpreter)."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    proc = in_process(capfd, "data", "info", str(folder_data))
    assert proc.returncode == 0, proc.stderr
    assert "36 train, 12 test, 3 classes" in proc.stdout and list(here.iterdir()) == []
    proc = in_process(capfd, "data", "info", str(folder_data), "--out", str(tmp_path / "grid.png"))
    assert proc.returncode == 0 and (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert list(here.iterdir()) == []


def test_train_help_lists_the_recipes_with_examples(tmp_path):
    from cifarflow import config

    proc = cifarflow("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for recipe in config.available_recipes():
        assert recipe in proc.stdout, recipe
    assert "Examples" in proc.stdout and "cifarflow train cnn_small --limit" in proc.stdout


@pytest.mark.parametrize("command", ["train", "tune"])
def test_shell_completion_completes_recipe_names(tmp_path, command):
    """click's completion protocol (`_CIFARFLOW_COMPLETE=bash_complete`), as the bash script calls it."""
    proc = cifarflow(cwd=tmp_path, _CIFARFLOW_COMPLETE="bash_complete", COMP_WORDS=f"cifarflow {command} cnn",
                     COMP_CWORD="2")
    assert proc.returncode == 0, proc.stderr
    words = [line.split(",", 1)[1] for line in proc.stdout.splitlines()]
    assert {"cnn", "cnn_small"} <= set(words) and all(w.startswith("cnn") for w in words), proc.stdout
    assert proc.stderr == ""


def test_help_and_completion_do_not_import_tensorflow(tmp_path):
    """--help and completion answer at once: nothing heavy is imported for them."""
    script = ("import sys; from cifarflow.cli import main\n"
              "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('tensorflow', 'keras', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1].replace("'", '"')) == []


def test_the_python_api_imports_quietly(tmp_path):
    """No TensorFlow start-up chatter (absl, oneDNN, CUDA probes) when the package is imported."""
    script = ("from cifarflow.training.trainer import train\nfrom cifarflow.deploy import export, pull\n"
              "from cifarflow.evaluation import evaluator\nprint('imported')")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=env)
    assert proc.returncode == 0 and proc.stdout == "imported\n", proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[-2000:]


def test_completion_is_explained_in_the_help_and_the_scripts_work(tmp_path):
    proc = cifarflow("--help", cwd=tmp_path)
    assert '_CIFARFLOW_COMPLETE=bash_source cifarflow' in proc.stdout and "zsh_source" in proc.stdout
    script = cifarflow(cwd=tmp_path, _CIFARFLOW_COMPLETE="bash_source")
    assert script.returncode == 0 and "complete -o nosort -F" in script.stdout and "_CIFARFLOW_COMPLETE" in script.stdout


def test_completion_is_documented():
    text = (REPO / "docs" / "cli.md").read_text()
    assert "_CIFARFLOW_COMPLETE=bash_source" in text and "_CIFARFLOW_COMPLETE=zsh_source" in text
