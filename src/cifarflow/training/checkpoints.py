"""Crash-safe resume state: every checkpoint file is written to a temporary name and renamed into place,
before the epoch it records is logged to MLflow (DESIGN.md, "Backends and durability").

Layout of ``<checkpoint_dir>/backup``: ``epoch-<e>.weights.h5`` (model and optimizer variables after
epoch ``e``; the current and the previous one are kept) and ``state.json``, the commit point, naming the
current file, the previous one, the epoch to start from, the epoch's per-epoch metrics (re-logged on
resume when a kill came between the checkpoint and the MLflow log), the training seconds so far, the states of
the model's random seed generators (dropout and the like: not in the weights file) and the training phase
(``phase``: the index, 1-based, of the phase the epoch belongs to; ``phase_start``: its first epoch;
``spans``: the ``name:first-last`` epochs of the phases before it).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import keras
import numpy as np

from cifarflow.errors import CifarflowError

STATE = "state.json"
KILL_HOOK = "CIFARFLOW_TEST_KILL"  # tests only: "<point>:<epoch>[:<nth>]", see _kill_due
_kill_points_reached: dict[tuple[str, int], int] = {}


def _kill_due(point: str, epoch: int) -> bool:
    """Whether this process should SIGKILL itself now, at ``point`` of ``epoch``: ``$CIFARFLOW_TEST_KILL``
    (tests only) names them as ``<point>:<epoch>[:<nth>]`` and this is the ``nth`` time (1 by default) the
    process gets there (``durable:1:2``: in the second trial of a study). The points: ``partial`` = half a
    weights file written, ``durable`` = checkpoint on disk, epoch not yet logged to MLflow."""
    hook = os.environ.get(KILL_HOOK, "").split(":")
    if hook[:2] != [point, str(epoch)]:
        return False
    reached = _kill_points_reached[point, epoch] = _kill_points_reached.get((point, epoch), 0) + 1
    return reached == int((hook[2:3] or ["1"])[0])


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_atomically(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, rename to ``path``, fsync the folder: after a crash ``path`` is the old
    file or the whole new one, never a part."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# what a stateful callback must carry across a resume (set in its on_train_begin, updated per epoch)
CALLBACK_STATE = {"EarlyStopping": ("wait", "best", "best_epoch", "stopped_epoch"),
                  "ReduceLROnPlateau": ("wait", "best", "cooldown_counter")}


def _plain(value):
    """A JSON-able copy of a callback counter (NumPy scalars to Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


def _seed_states(model: keras.Model) -> list:
    """The state variables of ``model``'s random seed generators (dropout, noise, ...), in a fixed order:
    what ``model.variables`` holds beyond the weights."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def read_state(backup_dir: Path) -> dict | None:
    """The committed state of ``backup_dir`` (see the module docstring), or None when there is none."""
    try:
        return json.loads((Path(backup_dir) / STATE).read_text())
    except FileNotFoundError:
        return None


class DurableBackup(keras.callbacks.Callback):
    """Resume state written crash-safely at the end of every epoch (replaces ``keras.callbacks.BackupAndRestore``).

    Put it before the callback that logs the epoch to MLflow: when ``on_epoch_end`` returns, the epoch's
    weights and optimizer state are on disk. On ``on_train_begin`` it restores the last committed epoch
    (``fit`` then starts at the epoch after it).

    Args:
        backup_dir: folder of the state.
        epoch_metrics: callable ``(epoch, logs) -> dict`` giving the per-epoch metrics to keep with the
            checkpoint (the MLflow logger's), so that an epoch whose log was lost can be logged on resume.
        restore: restore the committed state when training begins (the first ``fit`` of a run).
        phase: ``{"phase": index, "phase_start": first epoch, "spans": [...]}`` of the phase being fitted,
            kept in the state (see the module docstring).
        stateful: callbacks whose counters are kept with the checkpoint and restored (``EarlyStopping``,
            ``ReduceLROnPlateau``); they must come before this one in ``fit``'s callbacks, so that the
            state of an epoch includes their decision on it (``stopped``: early stopping ended the phase).

    Raises:
        CifarflowError: the committed weights file is missing or damaged (the message names the
            previous good epoch).
    """

    def __init__(self, backup_dir: str | os.PathLike, epoch_metrics=None, restore: bool = True,
                 phase: dict | None = None, stateful: list[keras.callbacks.Callback] | None = None) -> None:
        super().__init__()
        self.backup_dir = Path(backup_dir)
        self.epoch_metrics = epoch_metrics
        self.restore = restore
        self.phase = dict(phase or {"phase": 1, "phase_start": 0, "spans": []})
        self.stateful = list(stateful or [])
        self._segment_start = time.perf_counter()
        self._seconds_before = 0.0

    def on_train_begin(self, logs=None):
        self._segment_start = time.perf_counter()
        state = read_state(self.backup_dir)
        self._seconds_before = float(state.get("train_seconds", 0.0)) if state else 0.0
        if not state or not self.restore:
            return
        weights = self.backup_dir / state["weights"]
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        try:
            self.model.load_weights(str(weights))
        except Exception as exc:
            previous = state.get("previous")
            good = (f"the previous good checkpoint is epoch {previous['epoch'] - 1} ({self.backup_dir / previous['weights']})"
                    if previous else "there is no earlier checkpoint")
            raise CifarflowError(
                f"the checkpoint of epoch {state['epoch'] - 1} ({weights}) is damaged "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {good}",
                f"to resume from the previous epoch, replace {self.backup_dir / STATE} by {STATE}.previous; "
                "or start a new run") from None
        for variable, value in zip(_seed_states(self.model), state.get("seed_states", [])):
            variable.assign(np.asarray(value, dtype=variable.dtype))
        for callback in self.stateful:
            for key, value in state.get("callbacks", {}).get(type(callback).__name__, {}).items():
                setattr(callback, key, value)
        self.model._initial_epoch = int(state["epoch"])

    def on_epoch_end(self, epoch, logs=None):
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch}.weights.h5"
        old = read_state(self.backup_dir)

        def write_weights(tmp: Path):
            if _kill_due("partial", epoch):
                self.model.save_weights(str(self.backup_dir / ".whole.weights.h5"))
                data = (self.backup_dir / ".whole.weights.h5").read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
                _sigkill()
            keras_tmp = tmp.with_name(tmp.name + ".weights.h5")  # Keras wants the .weights.h5 suffix
            self.model.save_weights(str(keras_tmp))
            os.replace(keras_tmp, tmp)

        _write_atomically(self.backup_dir / name, write_weights)
        state = {
            "epoch": epoch + 1, "weights": name,
            "previous": {k: old[k] for k in ("epoch", "weights")} if old else None,
            "metrics": {"step": epoch, "values": self.epoch_metrics(epoch, logs) if self.epoch_metrics else {}},
            "train_seconds": self._seconds_before + time.perf_counter() - self._segment_start,
            "seed_states": [np.asarray(keras.ops.convert_to_numpy(v)).tolist() for v in _seed_states(self.model)],
            **self.phase,
            "callbacks": {type(c).__name__: {k: _plain(getattr(c, k)) for k in CALLBACK_STATE[type(c).__name__]
                                              if hasattr(c, k)} for c in self.stateful},
            "stopped": bool(self.model.stop_training),
        }
        if old:
            _write_atomically(self.backup_dir / (STATE + ".previous"),
                              lambda tmp: tmp.write_text(json.dumps(old)))
        _write_atomically(self.backup_dir / STATE, lambda tmp: tmp.write_text(json.dumps(state)))  # commit
        keep = {name, old["weights"] if old else None}
        for stale in self.backup_dir.glob("epoch-*.weights.h5"):
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
        if _kill_due("durable", epoch):
            _sigkill()


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``keras.callbacks.ModelCheckpoint`` (weights only) whose file is written to a temporary name and
    renamed into place: a kill mid-write leaves the previous best file whole."""

    def _save_model(self, epoch, batch, logs):
        final = self.filepath
        tmp = str(Path(final).with_name(f".tmp-{os.getpid()}-{Path(final).name}"))
        self.filepath = tmp
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            self.filepath = final
        if os.path.exists(tmp):
            os.replace(tmp, final)
