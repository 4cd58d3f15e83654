"""`cifarflow predict`: the labels of image files, folders and archives by a logged, registered or ensemble model.

Images are decoded by :func:`cifarflow.serving.decode_image`, the decoder of the training data
and of the served model, and fed to the model's pyfunc as raw pixels, so a file gets the label
that `mlflow models serve` and the training run's evaluation would give it.
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifarflow import serving
from cifarflow.data.datasets import IMAGE_SUFFIXES
from cifarflow.errors import CifarflowError
from cifarflow.evaluation.metrics import tta_probs
from cifarflow.evaluation.scoring import check_tta

OUTPUT_FORMATS = (".csv", ".json", ".parquet")  # --out suffixes; "-" is CSV on stdout
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
BATCH_SIZE = 256


@dataclass
class Predictions:
    """What :func:`predict_paths` found: ``table`` (a DataFrame: ``path``, ``label``, ``probability``, one
    probability column per class) and ``unreadable`` (``(path, reason)`` of each file that did not decode)."""

    table: object
    unreadable: list[tuple[str, str]]


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not os.path.basename(name).startswith(".")


def _archive_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(shown path, bytes)`` of the image files in a .tar.gz/.tgz/.tar/.zip, in name order, read without
    extracting anything to disk."""
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for name in sorted(n for n in zf.namelist() if not n.endswith("/") and _is_image_name(n)):
                    yield f"{path}/{name}", zf.read(name)
        else:
            with tarfile.open(path) as tf:
                members = sorted((m for m in tf.getmembers() if m.isfile() and _is_image_name(m.name)),
                                 key=lambda m: m.name)
                for m in members:
                    yield f"{path}/{m.name}", tf.extractfile(m).read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CifarflowError(f"cannot read the archive {path}: {exc}",
                             "the archive is corrupt or truncated; copy it again") from None


def collect(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Path | bytes]]:
    """The images named by ``paths``, in order: ``(shown path, source)`` with source a file's path or an
    archive member's bytes (:func:`cifarflow.serving.decode_image` takes either).

    A file is taken as given (whatever its suffix); a folder contributes its
    ``.jpg``/``.jpeg``/``.png`` files, recursively, in path order; a
    ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archive its image members.

    Raises:
        CifarflowError: a path that does not exist, an unreadable archive, or no image at all.
    """
    items: list[tuple[str, Path | bytes]] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise CifarflowError(f"no such file or folder: {given}", "pass image files, folders or .tar.gz/.zip archives")
        if path.is_dir():
            found = sorted(Path(d) / f for d, _, files in os.walk(path) for f in files if _is_image_name(f))
            items += [(str(p), p) for p in found]
        elif is_archive(path):
            items += list(_archive_members(path))
        else:
            items.append((str(path), path))
    if not items:
        raise CifarflowError(f"no .jpg/.jpeg/.png image in {', '.join(str(p) for p in paths)}",
                             "pass image files, or folders and archives that hold some")
    return items


def _decode(source: Path | bytes) -> np.ndarray | str:
    """The pixels of one image, or why it cannot be read."""
    try:
        return serving.decode_image(source)
    except ValueError as exc:
        return str(exc)


def load_model(ref: str):
    """The pyfunc model of ``ref`` (``NAME@ALIAS``, ``models:/...``, ``runs:/RUN_ID``, a run id: a Keras
    model or a `cifarflow ensemble`), loaded from a private temporary copy (see
    :func:`cifarflow.tracking.refs.load_keras`).

    Raises:
        CifarflowError: unknown model, version, alias or run.
    """
    import mlflow

    from cifarflow.tracking.refs import resolve_model

    uri, _ = resolve_model(ref)
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.load_model(uri, dst_path=tmp)


def predict_paths(model, paths: Sequence[str | os.PathLike], *, batch_size: int = BATCH_SIZE, tta: str = "none",
                  progress: bool | None = None, report: Callable[[str], None] | None = None) -> Predictions:
    """Predict the label of every image in ``paths`` (see :func:`collect`).

    Args:
        model: a loaded pyfunc model (:func:`load_model`) taking raw pixels.
        paths: image files, folders, archives.
        batch_size: images decoded and predicted at a time.
        tta: ``none``, ``flip`` or ``multiview``, as for `cifarflow evaluate`
            (:func:`cifarflow.evaluation.metrics.tta_probs`).
        progress: show a progress bar over the images on stderr (None: only when stderr is a terminal).
        report: called with one line per unreadable file.

    Returns:
        :class:`Predictions`; the table holds the readable images only.

    Raises:
        CifarflowError: see :func:`collect`; an unknown ``tta``.
    """
    import pandas as pd
    from tqdm import tqdm

    check_tta(tta)
    items = collect(paths)
    rows: list[str] = []
    probs: list[np.ndarray] = []
    unreadable: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool, \
            tqdm(total=len(items), unit="img", file=sys.stderr, disable=None if progress is None else not progress,
                 leave=False) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            decoded = list(pool.map(_decode, [source for _, source in batch]))
            good = []
            for (shown, _), img in zip(batch, decoded):
                if isinstance(img, str):
                    unreadable.append((shown, img))
                    if report:
                        report(f"unreadable image {shown}: {img}")
                else:
                    good.append(img)
                    rows.append(shown)
            if good:
                probs.append(tta_probs(model.predict, np.stack(good), tta))
            bar.update(len(batch))
    if probs:
        p = np.concatenate(probs)
        names = serving.class_names_of(getattr(model, "model_config", None), p.shape[1])
        table = serving.prediction_table(p, names)
        table.insert(0, "path", rows)
    else:
        table = pd.DataFrame(columns=["path", "label", "probability"])
    return Predictions(table, unreadable)


def check_out(out: str) -> None:
    """Refuse an ``--out`` whose suffix is no known format (before any work).

    Raises:
        CifarflowError: not ``-`` and not ending in .csv, .json or .parquet.
    """
    if out != "-" and Path(out).suffix.lower() not in OUTPUT_FORMATS:
        raise CifarflowError(f"--out {out}: unknown format '{Path(out).suffix}'",
                             f"end it in {', '.join(OUTPUT_FORMATS)}, or pass --out - for CSV on stdout")


def write(table, out: str) -> None:
    """Write the table to ``out``: CSV, JSON (a list of records) or Parquet by its suffix, ``-`` CSV on stdout."""
    if out == "-":
        table.to_csv(sys.stdout, index=False)
        sys.stdout.flush()
        return
    suffix = Path(out).suffix.lower()
    if suffix == ".csv":
        table.to_csv(out, index=False)
    elif suffix == ".json":
        table.to_json(out, orient="records", indent=1)
    else:
        table.to_parquet(out, index=False)


def predict(ref: str, paths: Sequence[str | os.PathLike], out: str | None = "-", *, batch_size: int = BATCH_SIZE,
            tta: str = "none", skip_corrupt: bool = False, progress: bool | None = None,
            report: Callable[[str], None] | None = None) -> Predictions:
    """`cifarflow predict`: load ``ref``'s model, predict every image of ``paths``, write the table to ``out``
    (see :func:`write`; None writes nothing).

    Each unreadable file is one line to ``report``; with ``skip_corrupt`` they
    are left out of the table, else nothing is written and the first is named
    in the error.

    Returns:
        :class:`Predictions` (as written).

    Raises:
        CifarflowError: an unknown model, a missing path, no image, an unknown
            ``--out`` format, unreadable images without ``skip_corrupt``.
    """
    if out is not None:
        check_out(out)
    check_tta(tta)
    model = load_model(ref)
    result = predict_paths(model, paths, batch_size=batch_size, tta=tta, progress=progress, report=report)
    if result.unreadable and not skip_corrupt:
        first, why = result.unreadable[0]
        raise CifarflowError(f"{len(result.unreadable)} unreadable image(s), the first {first}: {why}",
                             "replace or delete them, or pass --skip-corrupt to skip them")
    if out is not None:
        write(result.table, out)
    return result
