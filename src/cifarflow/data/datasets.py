"""Data sources: load CIFAR-10-style datasets into uint8 NHWC arrays, cache them, split them."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from cifarflow.errors import CifarflowError
from cifarflow.serving import CIFAR10_CLASSES, IMAGE_SIZE, ImageSizeError, decode_image
from cifarflow.utils import sha256_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
log = logging.getLogger(__name__)  # progress lines; the CLI shows them
_CACHE_FORMAT = "v1"  # bump when the cached array layout changes
_PICKLE_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset.

    Attributes:
        x_train: uint8 array (N_train, 32, 32, 3), RGB, values 0..255.
        y_train: int64 array (N_train,), class indices into ``class_names``.
        x_test: uint8 array (N_test, 32, 32, 3).
        y_test: int64 array (N_test,).
        class_names: class names, index i names label i.
        checksum: sha256 (hex) of the decoded arrays and class names: equal for
            the same pixels whatever the file format they came from.
        source: the resolved source the arrays were read from.
        skipped_files: the corrupt image files dropped (only with ``skip_corrupt``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    checksum: str
    source: str = ""
    skipped_files: tuple[str, ...] = field(default=(), repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def cache_root() -> Path:
    """Folder for extracted archives and decoded-array caches.

    ``$CIFARFLOW_CACHE`` if set, else ``~/.cache/cifarflow``.
    """
    return Path(os.environ.get("CIFARFLOW_CACHE", Path.home() / ".cache" / "cifarflow"))


def keras_cifar10_dir() -> Path | None:
    """The Keras cache of the pickled CIFAR-10 release, or None when absent.

    Keras 3 extracts into ``<KERAS_HOME>/datasets/cifar-10-batches-py-target/
    cifar-10-batches-py``; older Keras used ``datasets/cifar-10-batches-py``.
    """
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    for candidate in (
        home / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py",
        home / "datasets" / "cifar-10-batches-py",
    ):
        if (candidate / "test_batch").is_file():
            return candidate
    return None


def resolve_data_source(source: str | os.PathLike = "cifar10") -> str:
    """Resolve the ``data`` argument to a path, or to ``"download"``.

    ``cifar10`` resolves in this order: ``$CIFARFLOW_DATA`` if set, then the
    Keras cache (``~/.keras/datasets``), then ``"download"`` (Keras downloads
    the pickled release; needs internet). Any other value is returned as a path.
    """
    source = str(source)
    if source != "cifar10":
        return source
    env = os.environ.get("CIFARFLOW_DATA")
    if env:
        return env
    cached = keras_cifar10_dir()
    return str(cached) if cached else "download"


def load(
    source: str | os.PathLike = "cifar10",
    *,
    skip_corrupt: bool = False,
    resize: bool = False,
    use_cache: bool = True,
    trust_data: bool = False,
) -> Dataset:
    """Load a dataset as uint8 NHWC arrays.

    Sources: ``cifar10`` (see :func:`resolve_data_source`), a directory in the
    canonical ``cifar-10-batches-py`` pickle layout, a class-folder tree
    ``{train,test}/<class>/*.(jpg|jpeg|png)``, or a ``.tar.gz``/``.tgz``/``.tar``/
    ``.zip`` archive holding either (extracted once under :func:`cache_root`,
    never beside the archive; a single top folder inside is allowed).

    The pickle layout is read with a restricted unpickler that builds only
    what the official release holds (builtin types and NumPy arrays), so a
    crafted batch cannot run code; a file that needs anything else is refused
    unless ``trust_data`` (then it is unpickled as is: only for files you trust).
    Labels must index the class names (10 for CIFAR-10, or ``batches.meta``'s).

    Decoded arrays are cached as ``.npz`` under :func:`cache_root`, keyed by the
    archive's sha256 (or a directory's file list, sizes and mtimes) and the
    decoding options, so the second load takes seconds. Extraction and decoding
    of one source run under an inter-process lock (``filelock``), and every
    cache file is written to a temporary name and renamed into place, so
    processes that load the same source at once on an empty cache all get
    every image, and a killed one leaves no partial cache.

    Args:
        source: ``"cifar10"`` or a path.
        skip_corrupt: drop unreadable images (listed in ``Dataset.skipped_files``)
            instead of failing.
        resize: resize images that are not 32x32 instead of failing.
        use_cache: read and write the decoded-array cache.
        trust_data: unpickle the pickle layout without restrictions (can run code).

    Returns:
        A :class:`Dataset`.

    Raises:
        CifarflowError: missing path, unknown layout, empty class folder,
            corrupt images, train/test class sets that differ, wrong image size,
            a pickle that needs more than builtins and NumPy arrays (without
            ``trust_data``), labels outside the classes.
    """
    resolved = resolve_data_source(source)
    if resolved == "download":
        return _load_keras_download()
    path = Path(resolved).expanduser().absolute()  # logged as data_source: valid from any directory
    if not path.exists():
        raise CifarflowError(
            f"data source not found: {path}",
            "pass --data with an existing folder or archive, or set CIFARFLOW_DATA",
        )
    options = f"{_CACHE_FORMAT}|skip_corrupt={skip_corrupt}|resize={resize}"
    key = hashlib.sha256((_fingerprint(path) + options).encode()).hexdigest()[:24]
    cache_file = cache_root() / "arrays" / f"{key}.npz"
    if use_cache and (cached := _try_cache(cache_file, path)):
        return cached
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_file.with_suffix(".lock")):  # one decoder per source and options; the others wait
        if use_cache and (cached := _try_cache(cache_file, path)):  # decoded while we waited
            return cached
        log.info("reading %s: %sdecoding the images, cached for the next run", path,
                 "extracting the archive, " if path.is_file() else "")
        root = _extract(path) if path.is_file() else path
        dataset = _load_root(_find_layout_root(root, path), skip_corrupt=skip_corrupt, resize=resize,
                             trust_data=trust_data)
        dataset = Dataset(**{**dataset.__dict__, "source": str(path)})
        if use_cache:
            _write_cache(cache_file, dataset)
    return dataset


def _try_cache(cache_file: Path, path: Path) -> Dataset | None:
    """The cached arrays, or None (absent, or broken: removed, to be rebuilt)."""
    if not cache_file.is_file():
        return None
    try:
        return _read_cache(cache_file, str(path))
    except Exception:  # a broken cache is rebuilt, never fatal
        cache_file.unlink(missing_ok=True)
        return None


def train_val_split(
    x: np.ndarray, y: np.ndarray, val_fraction: float = 0.1, seed: int = 42
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, stratified split of the training set into train and validation.

    Args:
        x: images (N, H, W, C).
        y: int labels (N,).
        val_fraction: fraction of N held out, in [0, 1). 0 returns empty
            validation arrays.
        seed: random seed; the same seed gives the same split.

    Returns:
        ``(x_train, y_train, x_val, y_val)``; each class keeps its proportion.

    Raises:
        CifarflowError: ``val_fraction`` outside [0, 1) or too small a class.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CifarflowError(
            f"val_fraction={val_fraction} is outside [0, 1)", "use e.g. --set val_fraction=0.1"
        )
    if val_fraction == 0.0:
        return x, y, x[:0], y[:0]
    from sklearn.model_selection import train_test_split

    try:
        x_tr, x_val, y_tr, y_val = train_test_split(
            x, y, test_size=val_fraction, stratify=y, random_state=seed
        )
    except ValueError as exc:
        raise CifarflowError(
            f"cannot make a stratified validation split of {len(y)} images: {exc}",
            "use more images (--limit) or a larger val_fraction",
        ) from None
    return x_tr, y_tr, x_val, y_val


def limit_per_class(x: np.ndarray, y: np.ndarray, limit: int | None, seed: int = 42):
    """A seeded, stratified subsample of ``limit`` images (for smoke runs).

    Returns ``(x, y)`` unchanged when ``limit`` is None or >= N; the images keep
    their original order.

    Raises:
        CifarflowError: ``limit`` is not positive.
    """
    if limit is None or limit >= len(y):
        return x, y
    if limit <= 0:
        raise CifarflowError(f"limit={limit} must be positive", "use e.g. --limit 5000")
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        picked, _ = train_test_split(idx, train_size=limit, stratify=y, random_state=seed)
    except ValueError:  # fewer images than classes: a plain seeded sample
        picked = np.random.default_rng(seed).choice(idx, size=limit, replace=False)
    picked = np.sort(picked)
    return x[picked], y[picked]


CLASS_GROUPS = {
    "animals": ("bird", "cat", "deer", "dog", "frog", "horse"),
    "vehicles": ("airplane", "automobile", "ship", "truck"),
}


def select_classes(ds: Dataset, classes: list[str] | str | None) -> Dataset:
    """Keep only ``classes`` (names, or a :data:`CLASS_GROUPS` name) in both splits.

    Labels are renumbered 0..k-1 in the dataset's own class order; the
    checksum stays that of the source (the subset is a recipe setting).

    Raises:
        CifarflowError: an unknown class name, or fewer than two classes.
    """
    if classes is None:
        return ds
    names = CLASS_GROUPS[classes] if isinstance(classes, str) and classes in CLASS_GROUPS else classes
    names = [names] if isinstance(names, str) else list(names)
    unknown = [c for c in names if c not in ds.class_names]
    if unknown or len(set(names)) < 2:
        raise CifarflowError(
            f"bad classes {names}" + (f": {unknown} not in the dataset" if unknown else " (need two or more)"),
            f"pick two or more of: {', '.join(ds.class_names)}, or classes=animals / classes=vehicles",
        )
    keep = [i for i, c in enumerate(ds.class_names) if c in names]
    relabel = np.full(len(ds.class_names), -1, np.int64)
    relabel[keep] = np.arange(len(keep))
    tr, te = np.isin(ds.y_train, keep), np.isin(ds.y_test, keep)
    return dataclasses.replace(
        ds, x_train=ds.x_train[tr], y_train=relabel[ds.y_train[tr]], x_test=ds.x_test[te],
        y_test=relabel[ds.y_test[te]], class_names=tuple(ds.class_names[i] for i in keep),
    )


def dataset_checksum(x_train, y_train, x_test, y_test, class_names) -> str:
    """sha256 (hex) over the decoded arrays and class names."""
    h = hashlib.sha256()
    for arr in (x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(class_names).encode())
    return h.hexdigest()


def class_counts(y: np.ndarray, class_names) -> dict[str, int]:
    """Number of images per class name."""
    counts = np.bincount(y, minlength=len(class_names))
    return {name: int(n) for name, n in zip(class_names, counts)}


# ---------------------------------------------------------------- internals


def _make(x_train, y_train, x_test, y_test, class_names, skipped=()) -> Dataset:
    y_train = np.asarray(y_train, dtype=np.int64).reshape(-1)
    y_test = np.asarray(y_test, dtype=np.int64).reshape(-1)
    class_names = tuple(class_names)
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=class_names,
        checksum=dataset_checksum(x_train, y_train, x_test, y_test, class_names),
        skipped_files=tuple(skipped),
    )


def _load_keras_download() -> Dataset:
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # no network, proxy, truncated download...
        raise CifarflowError(
            f"could not download CIFAR-10 through Keras: {type(exc).__name__}: {exc}".splitlines()[0],
            "connect to the internet once, or pass --data PATH / set CIFARFLOW_DATA to a local copy",
        ) from None
    cached = keras_cifar10_dir()  # where Keras put it: a source the run's data_source can reload
    return Dataset(**{**_make(x_train, y_train, x_test, y_test, CIFAR10_CLASSES).__dict__,
                      "source": str(cached) if cached else "cifar10"})


def _fingerprint(path: Path) -> str:
    """Cheap identity of a source: sha256 of an archive, or a folder's file stats."""
    if path.is_file():
        return "file:" + sha256_file(path)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return "dir:" + h.hexdigest()


def _extract(archive: Path) -> Path:
    name = archive.name.lower()
    if not (name.endswith((".tar.gz", ".tgz", ".tar", ".zip"))):
        raise CifarflowError(
            f"unsupported data file: {archive}",
            "pass a folder, or a .tar.gz/.tgz/.tar/.zip archive of one",
        )
    digest = _fingerprint(archive).split(":", 1)[1][:24]
    target = cache_root() / "extracted" / digest
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(digest + ".lock")):  # never remove a folder another process reads
        if not (target / ".complete").is_file():
            _extract_into(archive, target)
    return target


def _extract_into(archive: Path, target: Path) -> None:
    """Extract into a temporary folder beside ``target``, then rename it into place (under the caller's lock)."""
    name = archive.name.lower()
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    # tar: the "data" extraction filter refuses absolute paths, links out of the folder and device files;
    # zip: zipfile strips absolute paths and ".." itself (and takes no filter)
    safe = {} if name.endswith(".zip") else {"filter": "data"}
    try:
        shutil.unpack_archive(archive, tmp, **safe)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CifarflowError(
            f"cannot extract {archive}: {exc}", "the archive is corrupt or truncated; copy it again"
        ) from None
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of a killed process
    tmp.rename(target)


def _is_pickle_root(d: Path) -> bool:
    return (d / "test_batch").is_file() and (d / "data_batch_1").is_file()


def _is_folder_root(d: Path) -> bool:
    return (d / "train").is_dir() and (d / "test").is_dir()


def _find_layout_root(root: Path, shown: Path) -> Path:
    """The folder holding the layout: ``root`` itself or up to two levels down."""
    frontier = [root]
    for _ in range(3):
        for d in frontier:
            if _is_pickle_root(d) or _is_folder_root(d):
                return d
        frontier = [c for d in frontier for c in sorted(d.iterdir()) if c.is_dir()]
    raise CifarflowError(
        f"{shown} holds neither a cifar-10-batches-py pickle layout "
        "(data_batch_1..5, test_batch) nor class folders train/<class>/ and test/<class>/",
        "point --data at a folder or archive in one of those layouts",
    )


def _load_root(root: Path, *, skip_corrupt: bool, resize: bool, trust_data: bool = False) -> Dataset:
    if _is_pickle_root(root):
        return _load_pickle_dir(root, trust_data=trust_data)
    return _load_class_folders(root, skip_corrupt=skip_corrupt, resize=resize)


class _UntrustedPickle(Exception):
    """A pickle asked for a global that a CIFAR-10 batch never holds."""


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what the pickled CIFAR-10 release holds: builtin types (dict, list, bytes, str, int,
    ...; these need no global) and NumPy arrays, as pickled by NumPy 1 and 2 at any protocol. Any
    other global (``os.system``, ``builtins.eval``, a class) raises :class:`_UntrustedPickle` before it
    is looked up, so nothing in the file can run."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
        ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise _UntrustedPickle(f"{module}.{name}") from None


def _load_pickle_dir(root: Path, *, trust_data: bool = False) -> Dataset:
    """Read the ``cifar-10-batches-py`` layout with :class:`_BatchUnpickler` (plain ``pickle`` when
    ``trust_data``); check shapes, pixel dtype and that every label indexes the class names."""

    def read(name: str) -> dict:
        file = root / name
        if not file.is_file():
            raise CifarflowError(
                f"missing {file} in the cifar-10-batches-py layout",
                "restore the file, or download the dataset again",
            )
        try:
            with open(file, "rb") as f:
                batch = pickle.load(f, encoding="bytes") if trust_data else _BatchUnpickler(f, encoding="bytes").load()
        except _UntrustedPickle as exc:
            raise CifarflowError(
                f"{file} is a pickle that asks for {exc}, which no CIFAR-10 batch holds: loading it could run code",
                "use the official release; only if you trust where this file came from, pass --trust-data",
            ) from None
        except Exception as exc:
            raise CifarflowError(
                f"cannot read {file}: {type(exc).__name__}: {exc}",
                "the file is corrupt; download the dataset again",
            ) from None
        if not isinstance(batch, dict):
            raise CifarflowError(f"{file} is not a CIFAR-10 batch (it holds a {type(batch).__name__}, not a dict)",
                                 "the file is corrupt; download the dataset again")
        return batch

    def arrays(batch: dict, name: str):
        try:
            data = np.asarray(batch[b"data"])
            labels = np.asarray(batch[b"labels"])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
                raise ValueError(f"data is {data.dtype} {data.shape}, not uint8 (N, {3 * IMAGE_SIZE * IMAGE_SIZE})")
            if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
                raise ValueError(f"labels are {labels.dtype} {labels.shape}, not {len(data)} integers")
            return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1), labels.astype(np.int64)
        except (KeyError, ValueError, TypeError) as exc:
            raise CifarflowError(
                f"{root / name} is not a CIFAR-10 batch ({type(exc).__name__}: {exc})",
                "the file is corrupt; download the dataset again",
            ) from None

    batches = {n: arrays(read(n), n) for n in _PICKLE_FILES}
    names = CIFAR10_CLASSES
    if (root / "batches.meta").is_file():
        meta = read("batches.meta")
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])) \
            or CIFAR10_CLASSES
    for n, (_, labels) in batches.items():
        bad = labels[(labels < 0) | (labels >= len(names))]
        if len(bad):
            raise CifarflowError(
                f"{root / n} has {len(bad)} label(s) outside 0..{len(names) - 1} ({len(names)} classes), "
                f"e.g. {', '.join(str(v) for v in np.unique(bad)[:5])}",
                "fix or remove the file, or download the dataset again",
            )
    x_train = np.concatenate([batches[n][0] for n in _PICKLE_FILES[:-1]])
    y_train = np.concatenate([batches[n][1] for n in _PICKLE_FILES[:-1]])
    return _make(x_train, y_train, *batches["test_batch"], names)


def _list_split(split_dir: Path) -> dict[str, list[Path]]:
    classes = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise CifarflowError(
            f"no class folders in {split_dir}", f"put images in {split_dir}/<class>/*.jpg"
        )
    files = {}
    for d in classes:
        imgs = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise CifarflowError(
                f"empty class folder {d} (no .jpg/.jpeg/.png files)",
                "add images to it or remove the folder",
            )
        files[d.name] = imgs
    return files


def _decode(path: Path, resize: bool) -> np.ndarray | str | None:
    """Decode one image file with :func:`cifarflow.serving.decode_image` (the decoder of served images
    too) to uint8 (32, 32, 3); None if unreadable; ``"WxH"`` if not 32x32 and not ``resize``."""
    try:
        return decode_image(path, resize=resize)
    except ImageSizeError as exc:
        return exc.size
    except ValueError:
        return None


def _load_class_folders(root: Path, *, skip_corrupt: bool, resize: bool) -> Dataset:
    train_files = _list_split(root / "train")
    test_files = _list_split(root / "test")
    if set(train_files) != set(test_files):
        only_train = sorted(set(train_files) - set(test_files))
        only_test = sorted(set(test_files) - set(train_files))
        raise CifarflowError(
            f"train and test class folders differ in {root}: only in train {only_train}, "
            f"only in test {only_test}",
            "give both splits the same class folders",
        )
    class_names = tuple(sorted(train_files))
    index = {c: i for i, c in enumerate(class_names)}
    corrupt: list[str] = []
    out = []
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for files in (train_files, test_files):
            paths = [(p, index[c]) for c in class_names for p in files[c]]
            decoded = list(pool.map(lambda pl: _decode(pl[0], resize), paths, chunksize=256))
            for (p, _), img in zip(paths, decoded):
                if isinstance(img, str):
                    raise CifarflowError(
                        f"{p} is {img} pixels, not {IMAGE_SIZE}x{IMAGE_SIZE}",
                        "resize the images, or pass --resize to resize them on load",
                    )
            keep = [i for i, img in enumerate(decoded) if img is not None]
            corrupt += [str(paths[i][0]) for i, img in enumerate(decoded) if img is None]
            x = np.stack([decoded[i] for i in keep]) if keep else np.zeros((0, 32, 32, 3), np.uint8)
            y = np.array([paths[i][1] for i in keep], dtype=np.int64)
            out.append((x, y))
    if corrupt and not skip_corrupt:
        shown = ", ".join(corrupt[:5]) + (f" and {len(corrupt) - 5} more" if len(corrupt) > 5 else "")
        raise CifarflowError(
            f"{len(corrupt)} unreadable or corrupt image(s): {shown}",
            "replace or delete them, or pass --skip-corrupt to drop them",
        )
    (x_train, y_train), (x_test, y_test) = out
    return _make(x_train, y_train, x_test, y_test, class_names, skipped=corrupt)


def _write_cache(cache_file: Path, ds: Dataset) -> None:
    """Write to a temporary file of this process, then rename: a killed or concurrent writer never
    leaves half a cache."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cache_file.stem}-", suffix=".tmp", dir=cache_file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
                class_names=np.array(ds.class_names), checksum=np.array(ds.checksum),
                skipped_files=np.array(ds.skipped_files, dtype=str),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(cache_file: Path, source: str) -> Dataset:
    with np.load(cache_file, allow_pickle=False) as z:
        skipped = tuple(str(s) for s in z["skipped_files"])
        return Dataset(
            x_train=z["x_train"], y_train=z["y_train"], x_test=z["x_test"], y_test=z["y_test"],
            class_names=tuple(str(c) for c in z["class_names"]), checksum=str(z["checksum"]),
            source=source, skipped_files=skipped,
        )
