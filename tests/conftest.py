"""Shared fixtures: isolated MLflow/caches per test, tiny generated datasets in both layouts, a server helper."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
CLASSES3 = ("cat", "dog", "ship")


def session_root(tmp_path_factory) -> Path:
    """The folder this pytest session's processes share: the base temp folder, or under xdist its parent (the
    controller's base, which holds each worker's)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def isolate(monkeypatch, root: Path) -> None:
    """Point caches, checkpoints, the MLflow store and the working directory into ``root``."""
    monkeypatch.setenv("CIFARFLOW_CACHE", str(root / "cache"))
    monkeypatch.setenv("CIFARFLOW_CHECKPOINTS", str(root / "checkpoints"))
    monkeypatch.setenv("CIFARFLOW_RECIPES", str(REPO / "experiments"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # the process-wide URI wins over the env
    # and so does the experiment an earlier test's mlflow.set_experiment made active (an id of its own store)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("KERAS_HOME", str(root / "keras_home"))
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # a sampling thread per run: on where tested
    monkeypatch.delenv("CIFARFLOW_DATA", raising=False)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)  # mlflow.set_experiment exports the id
    monkeypatch.chdir(root)


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for every JAX process this session starts (the test_backends
    subprocesses, the bench scripts): a tiny JAX run spends ~13 of its ~24 s compiling the same programs
    (initializers, train and test steps) that the previous process compiled. Shared by the xdist workers of
    one session (their base temp folders' parent), fresh each session, so no run depends on an earlier one."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(session_root(tmp_path_factory) / "jax-compilation-cache")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # default 1 s: most tiny programs are below
    yield


@pytest.fixture(scope="session")
def empty_store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once per session (xdist worker): creating one runs MLflow's schema
    migrations (~1.7 s on the 2-core CI machine), copying one takes milliseconds."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("empty_store_template")
    MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments(max_results=1)
    return root / "mlflow.db"


def fresh_store(template: Path, root: Path) -> None:
    """``root/mlflow.db``: a copy of the empty ``template`` whose Default experiment (id 0) keeps its
    artifacts in ``root/mlruns/0``, as a store created in ``root`` would (the one path a new store records)."""
    import shutil
    import sqlite3

    shutil.copyfile(template, root / "mlflow.db")
    with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (str(root / "mlruns" / "0"),))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch, empty_store_template):
    """Every test gets its own cache, checkpoint folder, MLflow store (an empty one, copied from the session's
    template) and working directory."""
    fresh_store(empty_store_template, tmp_path)
    isolate(monkeypatch, tmp_path)
    yield


def class_images(n: int, label: int, seed: int) -> np.ndarray:
    """uint8 (n, 32, 32, 3) images whose mean colour depends on the label (learnable)."""
    rng = np.random.default_rng(seed)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]] * 4)[label % 12]
    noise = rng.integers(-40, 40, size=(n, 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_class_folders(root: Path, per_class=(12, 4), classes=CLASSES3, suffix=".png", seed=0):
    """A ``{train,test}/<class>/*.png`` tree; returns ``{split: (x, y)}`` as written."""
    from PIL import Image

    written = {}
    for split, n in zip(("train", "test"), per_class):
        xs, ys = [], []
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            imgs = class_images(n, c, seed + 17 * c + (split == "test"))
            for i, img in enumerate(imgs):
                Image.fromarray(img).save(d / f"{i:04d}{suffix}")
            xs.append(imgs)
            ys += [c] * n
        written[split] = (np.concatenate(xs), np.array(ys))
    return written


def write_pickle_dir(root: Path, per_batch: int = 20, seed: int = 0):
    """A ``cifar-10-batches-py`` layout with 10 classes; returns the arrays as written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        y = [int(v) for v in np.arange(per_batch) % 10]
        flat = x.transpose(0, 3, 1, 2).reshape(per_batch, -1)  # the release stores CHW rows
        with open(root / name, "wb") as f:
            pickle.dump({b"data": flat, b"labels": y, b"batch_label": name.encode()}, f)
        xs.append(x)
        ys.append(np.array(y))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


@pytest.fixture
def folder_data(tmp_path) -> Path:
    root = tmp_path / "folders"
    write_class_folders(root)
    return root


@pytest.fixture
def train_data(tmp_path) -> Path:
    """A tiny learnable dataset for training tests: 3 classes, 24 train / 6 test images each."""
    root = tmp_path / "train_data"
    write_class_folders(root, per_class=(24, 6))
    return root


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory):
    """One tiny cnn trained once per session in its own folder (MLflow store, artifacts, data); returns (folder, TrainResult)."""
    root = tmp_path_factory.mktemp("trained_store")
    data = root / "train_data"
    write_class_folders(data, per_class=(24, 6))
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        from cifarflow import config
        from cifarflow.training.trainer import train

        result = train(config.resolve("cnn_small", {
            "width": 0.125, "dense_units": 16, "batch_size": 16, "val_fraction": 0.25, "warmup_epochs": 0,
            "epochs": 1, "data": str(data)}), quiet=True)
    return root, result


@pytest.fixture
def trained(trained_store, tmp_path):
    """The session's tiny trained run, in this test's own MLflow store (a copy of the session's database)."""
    import shutil

    root, result = trained_store
    shutil.copyfile(root / "mlflow.db", tmp_path / "mlflow.db")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: list[str], log_path: Path, ready: str, timeout: float = 240):
    """Run ``mlflow <args> -h 127.0.0.1 -p PORT`` until ``GET <ready>`` answers 200; yields the base URL.

    The server runs in its own session and is stopped (with its workers) on exit.
    """
    port = free_port()
    mlflow_exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(log_path, "wb")
    # MLflow 3's server also starts huey job consumers (GenAI jobs, 20 processes): no test uses them
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([mlflow_exe, *args, "-h", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}{ready}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server did not come up in {timeout:.0f} s"
            time.sleep(1)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def predict_in_fresh_process(flavor: str, model_uri: str, x: np.ndarray, folder: Path, images: bool = False):
    """``mlflow.<flavor>.load_model(model_uri).predict(x)`` in a new interpreter that never imports cifarflow
    (the model must load where cifarflow is not installed); ``flavor`` is ``pyfunc`` or ``keras``; ``x`` is
    saved under ``folder``, the process's working directory. Returns the predictions, float ``(N, C)``.
    With ``images`` (pyfunc only), the same pixels also go in as PNG files' bytes in a DataFrame column
    ``image``: returns ``(predictions, that answer's per-class columns (N, C), its labels)``."""
    np.save(folder / "x.npy", x)
    verbose = ", verbose=0" if flavor == "keras" else ""
    script = ("import io, json, sys, mlflow, numpy as np\n"
              f"m = mlflow.{flavor}.load_model({model_uri!r})\n"
              f"x = np.load({str(folder / 'x.npy')!r})\n"
              f"out = {{'probs': m.predict(x{verbose}).tolist()}}\n")
    if images:
        script += ("import pandas as pd\n"
                   "from PIL import Image\n"
                   "def png(a):\n"
                   "    b = io.BytesIO(); Image.fromarray(a.astype('uint8')).save(b, format='PNG'); return b.getvalue()\n"
                   "t = m.predict(pd.DataFrame({'image': [png(a) for a in x]}))\n"
                   "out['table'] = t.drop(columns=['label', 'probability']).to_numpy(np.float64).tolist()\n"
                   "out['labels'] = list(t['label'])\n")
    script += ("assert 'cifarflow' not in sys.modules\n"
               "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=folder, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if images:
        return np.array(out["probs"]), np.array(out["table"]), out["labels"]
    return np.array(out["probs"])


def post(url: str, body: bytes, timeout: float = 60) -> tuple[int, bytes]:
    """POST a JSON body; ``(status, body)``, also for 4xx/5xx answers."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------- PostgreSQL-backed tracking server

PG_ROLE, PG_ROLE_PASSWORD = "cifarflow", "pg-Secret-4711"  # the password the masking tests look for


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster for the session (see ``pgcluster``); skipped without PostgreSQL
    unless ``CIFARFLOW_REQUIRE_POSTGRES`` is set (``.ci/run`` sets it)."""
    import pgcluster

    if pgcluster.postgres_bindir() is None:
        if os.environ.get("CIFARFLOW_REQUIRE_POSTGRES"):
            pytest.fail("CIFARFLOW_REQUIRE_POSTGRES is set but initdb/pg_ctl are missing (apt-get install postgresql)")
        pytest.skip("needs Debian's postgresql (apt-get install postgresql)")
    with pgcluster.cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_database(postgres):
    """A fresh database on the session cluster, owned by ``PG_ROLE``; returns its URL (with the password)."""
    import secrets

    return postgres.create_database(f"db_{secrets.token_hex(4)}", PG_ROLE, PG_ROLE_PASSWORD)


@pytest.fixture(scope="session")
def pg_mlflow_server_url(postgres, tmp_path_factory):
    """``mlflow server`` as a team runs it, for the session: PostgreSQL backend store (its own database),
    proxied artifact storage (``--artifacts-destination``), bound to 127.0.0.1; yields its URL."""
    import secrets

    root = tmp_path_factory.mktemp("mlflow_server")
    backend = postgres.create_database(f"mlflow_{secrets.token_hex(4)}", PG_ROLE, PG_ROLE_PASSWORD)
    args = ["server", "--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts"),
            "--workers", "2"]
    with serving(args, root / "mlflow-server.log", "/health") as base:
        yield base


@pytest.fixture
def mlflow_pg_server(pg_mlflow_server_url, monkeypatch):
    """The session's PostgreSQL-backed ``mlflow server``, as this test's ``MLFLOW_TRACKING_URI``; yields its URL.
    Tests share its store: each tells its runs apart by its own data path (the ``data_source`` param)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pg_mlflow_server_url)
    mlflow.set_tracking_uri(pg_mlflow_server_url)
    yield pg_mlflow_server_url
