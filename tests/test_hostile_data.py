"""Hostile data, the hostile way, through the command line: concurrent first use of an archive (issue 11
item 5), a pickle that runs a command (item 6), labels outside the classes (item 7)."""

from __future__ import annotations

import os
import pickle
import subprocess
import tarfile
from pathlib import Path

import pytest
from clirun import CIFARFLOW, assert_one_line_error, in_process
from conftest import write_class_folders, write_pickle_dir


class RunsACommand:
    """Unpickling this runs ``touch <marker>`` (what an attacker's ``data_batch_1`` would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poison(batch_file: Path, marker: Path, keep_valid: bool = True) -> None:
    """Rewrite ``batch_file`` so that loading it runs a command; with ``keep_valid`` it still holds a valid batch."""
    with open(batch_file, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    payload = {**batch, b"note": RunsACommand(marker)} if keep_valid else RunsACommand(marker)
    with open(batch_file, "wb") as f:
        pickle.dump(payload, f)


@pytest.mark.parametrize("keep_valid", [True, False], ids=["returns-a-valid-batch", "returns-garbage"])
def test_a_pickle_that_runs_a_command_is_refused_and_never_runs(tmp_path, keep_valid, capfd):
    data, marker = tmp_path / "batches", tmp_path / "PWNED"
    write_pickle_dir(data)
    poison(data / "data_batch_1", marker, keep_valid)
    line = assert_one_line_error(in_process(capfd, "data", "info", data, "--out", tmp_path / "grid.png"),
                                 "data_batch_1", "--trust-data")
    assert not marker.exists(), line

    archive = tmp_path / "batches.tar.gz"  # the same files in an archive: refused alike
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(data, arcname="cifar-10-batches-py")
    assert_one_line_error(in_process(capfd, "data", "info", archive, "--out", tmp_path / "grid.png"), "--trust-data")
    assert not marker.exists()
    assert not list((tmp_path / "cache").glob("arrays/*.npz"))  # nothing decoded was cached

    train = in_process(capfd, "train", "simple5", "--data", data, "--epochs", "1", "--quiet")
    assert_one_line_error(train, "--trust-data")
    assert not marker.exists()


def test_trust_data_is_the_explicit_way_to_load_such_a_pickle(tmp_path, capfd):
    data, marker = tmp_path / "batches", tmp_path / "PWNED"
    write_pickle_dir(data)
    poison(data / "data_batch_1", marker)
    proc = in_process(capfd, "data", "info", data, "--out", tmp_path / "grid.png", "--trust-data")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the user said so: unpickled as such
    assert "100 train, 20 test, 10 classes" in proc.stdout


def test_a_plain_pickle_layout_loads_without_trust(tmp_path, capfd):
    """Batches of builtins and NumPy arrays, as the official release holds, need no flag."""
    data = tmp_path / "batches"
    write_pickle_dir(data)
    proc = in_process(capfd, "data", "info", data, "--out", tmp_path / "grid.png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "100 train, 20 test, 10 classes" in proc.stdout


@pytest.mark.parametrize("bad", [42, -3, 10])
def test_labels_outside_the_classes_are_refused_at_load(tmp_path, bad, capfd):
    data = tmp_path / "batches"
    write_pickle_dir(data)
    with open(data / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"labels"][3] = bad
    with open(data / "data_batch_2", "wb") as f:
        pickle.dump(batch, f)
    line = assert_one_line_error(in_process(capfd, "data", "info", data, "--out", tmp_path / "grid.png"),
                                 "data_batch_2", str(bad), "10 classes")
    assert "Traceback" not in line


def test_concurrent_first_use_of_an_archive_gets_every_image(tmp_path, capfd):
    """Three processes open the same archive on an empty cache at once (with --skip-corrupt, which turned the
    race into silent data loss): each sees all images, and the one cached array file is complete."""
    write_class_folders(tmp_path / "src", per_class=(200, 20))
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src", arcname="cifar")
    for attempt in range(2):  # two fresh caches: the race was lost about half the time
        env = {**os.environ, "CIFARFLOW_CACHE": str(tmp_path / f"cache{attempt}")}
        procs = [subprocess.Popen([CIFARFLOW, "data", "info", str(archive), "--skip-corrupt",
                                   "--out", str(tmp_path / f"grid{attempt}-{i}.png")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for i in range(3)]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            assert "600 train, 60 test, 3 classes" in out and "skipped" not in out, out
        cached = list((tmp_path / f"cache{attempt}" / "arrays").glob("*.npz"))
        assert len(cached) == 1
        again = in_process(capfd, "data", "info", archive, "--out", tmp_path / "grid.png",
                           env={"CIFARFLOW_CACHE": env["CIFARFLOW_CACHE"]})
        assert "600 train, 60 test, 3 classes" in again.stdout, again.stderr[-2000:]
        leftovers = [p.name for p in (tmp_path / f"cache{attempt}").rglob("*") if ".tmp" in p.name or
                     p.name.startswith(".extract-")]
        assert not leftovers
