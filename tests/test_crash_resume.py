"""kill -9 inside the checkpoint window, made deterministic by the CIFARFLOW_TEST_KILL hook, then --resume
(issue 11 items 1 to 4): no epoch lost or logged twice, a damaged checkpoint is one line naming the previous
good epoch, a refused resume leaves the run as it was, train_seconds sums the segments, and a killed and
resumed run (with augmentation, RandAugment, MixUp and dropout; also a two-phase transfer run killed at the
phase boundary, then resumed and interrupted by Ctrl-C in its second phase) ends with exactly the metrics,
per-epoch history and weights of the same run uninterrupted.

Each uninterrupted reference run trains once per module, in this process and its own MLflow store; the killed
segments run as `cifarflow train` subprocesses (a real SIGKILL); the refused resumes, the Ctrl-C'd segment and
the last segment run the same command in this process."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pytest
from clirun import cli
from conftest import isolate, write_class_folders

from cifarflow import config
from cifarflow.cli import main
from cifarflow.errors import CifarflowError
from cifarflow.training import checkpoints, trainer
from cifarflow.training.checkpoints import KILL_HOOK

pytestmark = pytest.mark.slow

# cnn_small (dropout 0.2) with translation, flip, RandAugment and MixUp, 4 epochs of 3 batches
SINGLE = ("cnn_small", {"width": 0.125, "dense_units": 16, "batch_size": 16, "val_fraction": 0.25,
                        "warmup_epochs": 0, "mixup_alpha": 0.2, "randaugment_ops": 1, "epochs": 4})
# a transfer recipe: head 1 epoch (Adam), then fine_tune 2 epochs (SGD, top half of the backbone unfrozen)
TWO_PHASE = ("mobilenetv2", {"weights": "none", "resolution": 32, "alpha": 0.35, "batch_size": 16,
                             "val_fraction": 0.25, "crop_padding": 2, "mixup_alpha": 0.2, "head_epochs": 1,
                             "fine_tune_epochs": 2, "fine_tune_fraction": 0.5, "epochs": 3})
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
FINAL_METRICS = ("test_accuracy", "test_loss", "nll", "best_val_accuracy")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes, 16 training and 4 test images each (36 train / 12 validation after the split)."""
    root = tmp_path_factory.mktemp("data")
    write_class_folders(root, per_class=(16, 4))
    return root


def recipe_config(recipe, data_dir):
    name, overrides = recipe
    return config.resolve(name, {**overrides, "data": str(data_dir)})


def cli_args(recipe, data_dir):
    name, overrides = recipe
    sets = [a for k, v in overrides.items() if k != "epochs" for a in ("--set", f"{k}={v}")]
    return [name, "--data", data_dir, "--epochs", overrides["epochs"], "--quiet", *sets]


def finish(recipe, data_dir, resume: str | None = None) -> dict:
    """Train (or resume) ``recipe`` to the end in this process, without logging the model; returns what must
    not depend on kills: final metrics, every per-epoch value, phase tags, the final (best-epoch) weights."""
    seen = {}
    score = trainer._score_and_log

    def scoring(model, *args, **kwargs):
        seen["weights"] = model.get_weights()  # the weights scored on the test split
        return score(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "_score_and_log", scoring)
        result = trainer.train(recipe_config(recipe, data_dir), quiet=True, resume=resume, log_model=False)
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and (resume is None or result.run_id == resume)
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, key))
               for key in (*EPOCH_METRICS, "phase")}
    return {"metrics": {k: run.data.metrics[k] for k in FINAL_METRICS}, "history": history,
            "weights": seen["weights"], "train_seconds": run.data.metrics["train_seconds"],
            "tags": {k: v for k, v in run.data.tags.items() if k in ("cifarflow.phase", "cifarflow.phase_epochs")}}


def assert_same_run(resumed: dict, reference: dict) -> None:
    assert resumed["metrics"] == reference["metrics"]  # exactly, not approximately
    assert resumed["history"] == reference["history"]  # every epoch once, with the same values
    assert resumed["tags"] == reference["tags"]
    assert len(resumed["weights"]) == len(reference["weights"])
    for a, b in zip(resumed["weights"], reference["weights"]):
        np.testing.assert_array_equal(a, b)


def uninterrupted(recipe, data_dir, root) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        return finish(recipe, data_dir)


@pytest.fixture(scope="module")
def single_reference(data, tmp_path_factory):
    return uninterrupted(SINGLE, data, tmp_path_factory.mktemp("single_reference"))


@pytest.fixture(scope="module")
def two_phase_reference(data, tmp_path_factory):
    return uninterrupted(TWO_PHASE, data, tmp_path_factory.mktemp("two_phase_reference"))


def steps(run_id, key):
    return sorted(m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, key))


def killed(recipe, data_dir, kill: str) -> str:
    """`cifarflow train` until the hook SIGKILLs it; returns the run id."""
    proc = cli("train", *cli_args(recipe, data_dir), env={KILL_HOOK: kill})
    assert proc.returncode == -9, proc.stderr[-3000:]
    (run,) = mlflow.search_runs(experiment_names=[f"cifarflow/{recipe[0]}"], output_format="list")
    return run.info.run_id


def interrupted(recipe, data_dir, point: str, resume: str) -> None:
    """``--resume`` the run in this process until Ctrl-C at ``point``: the kill hook raises KeyboardInterrupt
    where a process would SIGKILL itself (the run ends KILLED, its checkpoint as a kill leaves it)."""
    def ctrl_c():
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KILL_HOOK, point)
        mp.setattr(checkpoints, "_sigkill", ctrl_c)
        mp.setattr(checkpoints, "_kill_points_reached", {})
        with pytest.raises(CifarflowError, match=f"continue it with the same command plus --resume {resume}"):
            trainer.train(recipe_config(recipe, data_dir), quiet=True, resume=resume, log_model=False)
    assert mlflow.tracking.MlflowClient().get_run(resume).info.status == "KILLED"


def one_line_error(capsys, argv, *fragments) -> str:
    """`cifarflow <argv>` run in this process exits 2 with one stderr line holding every fragment; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err[-3000:]
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


def test_killed_mid_checkpoint_with_a_refused_resume_and_a_damaged_checkpoint_it_ends_as_if_never_killed(
        data, single_reference, tmp_path, capsys):
    client = mlflow.tracking.MlflowClient()
    # 1. killed with half of epoch 2's checkpoint written: epoch 2 is not logged, its checkpoint never became durable
    run_id = killed(SINGLE, data, "partial:2")
    assert steps(run_id, "val_accuracy") == [0, 1]

    # 2. a resume with another recipe is refused before anything is written
    before = client.get_run(run_id)
    one_line_error(capsys, ["train", "simple5", "--data", data, "--epochs", 4, "--quiet", "--set", "batch_size=16",
                            "--set", "val_fraction=0.25", "--resume", run_id],
                   f"run {run_id} was logged with other settings", "cifarflow.recipe: cnn_small -> simple5")
    after = client.get_run(run_id)
    assert after.info.status == before.info.status and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags and after.data.params == before.data.params
    assert after.data.metrics == before.data.metrics

    # 3. the last durable checkpoint (epoch 1's) damaged behind our back: one line naming the previous good epoch
    current = tmp_path / "checkpoints" / run_id / "backup" / "epoch-1.weights.h5"
    saved = tmp_path / "saved.weights.h5"
    shutil.copyfile(current, saved)
    current.write_bytes(current.read_bytes()[:1000])
    one_line_error(capsys, ["train", *cli_args(SINGLE, data), "--resume", run_id],
                   "checkpoint of epoch 1", "is damaged", "previous good checkpoint is epoch 0")

    # 4. repaired, resumed to the end (in this process): the run the uninterrupted one was
    shutil.copyfile(saved, current)
    resumed = finish(SINGLE, data, resume=run_id)
    for key in (*EPOCH_METRICS, "epoch_seconds", "images_per_second"):
        assert steps(run_id, key) == [0, 1, 2, 3], key  # every epoch once, none lost, none twice
    assert_same_run(resumed, single_reference)


def test_a_two_phase_run_killed_at_the_phase_boundary_and_interrupted_in_its_second_phase_ends_as_if_never_killed(
        data, two_phase_reference):
    assert two_phase_reference["tags"] == {"cifarflow.phase": "fine_tune",
                                           "cifarflow.phase_epochs": "head:0-0,fine_tune:1-2"}
    assert two_phase_reference["history"]["phase"] == [(0, 1.0), (1, 2.0), (2, 2.0)]
    run_id = killed(TWO_PHASE, data, "durable:0")  # the head phase's last checkpoint durable, not logged
    assert steps(run_id, "val_accuracy") == []
    # resumed here, Ctrl-C once fine_tune's first epoch is durable, not logged (one real SIGKILL is enough: the
    # durable state is the kill's; the process boundary was another TensorFlow import)
    interrupted(TWO_PHASE, data, "durable:1", resume=run_id)
    assert steps(run_id, "val_accuracy") == [0]
    resumed = finish(TWO_PHASE, data, resume=run_id)
    for key in (*EPOCH_METRICS, "epoch_seconds", "images_per_second"):
        assert steps(run_id, key) == [0, 1, 2], key  # epochs 0 and 1 logged from their checkpoints, once
    assert steps(run_id, "trainable_param_count") == [0, 1]  # once per phase, not again on resume
    assert_same_run(resumed, two_phase_reference)
    epoch_seconds = sum(m.value for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "epoch_seconds"))
    assert resumed["train_seconds"] >= 0.99 * epoch_seconds  # all three segments, not only the last
