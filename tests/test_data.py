"""Data sources, caching, splitting and every bad-input case of cifarflow.data."""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES3, write_class_folders, write_pickle_dir

from cifarflow.data import datasets
from cifarflow.errors import CifarflowError


def test_pickle_layout_is_read_as_nhwc(tmp_path):
    x_tr, y_tr, x_te, y_te = write_pickle_dir(tmp_path / "cifar-10-batches-py")
    ds = datasets.load(tmp_path / "cifar-10-batches-py")
    assert ds.x_train.shape == (100, 32, 32, 3) and ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.x_train, x_tr)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.x_test, x_te)
    assert ds.y_test.dtype == np.int64
    assert ds.class_names == datasets.CIFAR10_CLASSES


def test_class_folders_are_read_with_sorted_classes(folder_data, monkeypatch):
    monkeypatch.chdir(folder_data.parent)
    ds = datasets.load(folder_data.name)
    assert ds.source == str(folder_data)  # absolute, whatever was typed
    assert ds.class_names == CLASSES3
    assert ds.x_train.shape == (36, 32, 32, 3) and ds.x_test.shape == (12, 32, 32, 3)
    assert datasets.class_counts(ds.y_train, ds.class_names) == {"cat": 12, "dog": 12, "ship": 12}


def test_png_pixels_survive_loading(tmp_path):
    written = write_class_folders(tmp_path / "d")
    ds = datasets.load(tmp_path / "d")
    np.testing.assert_array_equal(ds.x_train, written["train"][0])
    np.testing.assert_array_equal(ds.y_train, written["train"][1])


def test_checksum_depends_on_pixels_not_format(tmp_path):
    write_class_folders(tmp_path / "a", seed=1)
    write_class_folders(tmp_path / "b", seed=1)
    write_class_folders(tmp_path / "c", seed=2)
    a, b, c = (datasets.load(tmp_path / n) for n in "abc")
    assert a.checksum == b.checksum != c.checksum
    assert len(a.checksum) == 64


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
@pytest.mark.parametrize("layout", ["folders", "pickle"])
def test_archives_are_extracted_into_the_cache_not_beside(tmp_path, kind, layout):
    src = tmp_path / "src" / "top"
    if layout == "folders":
        write_class_folders(src)
    else:
        write_pickle_dir(src / "cifar-10-batches-py")
    expected = datasets.load(src, use_cache=False)
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    archive = archive_dir / f"data.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in src.rglob("*"):
                zf.write(p, p.relative_to(src.parent))
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(src, arcname="top")
    ds = datasets.load(archive)
    assert ds.checksum == expected.checksum
    assert os.listdir(archive_dir) == [archive.name]  # nothing extracted beside it
    assert any((tmp_path / "cache" / "extracted").iterdir())


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/cifarflow-absolute-escape.txt", "link"])
def test_a_tar_that_writes_outside_its_folder_is_refused(tmp_path, member):
    import io

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo(member)
        if member == "link":  # a symlink out of the extraction folder
            info.type, info.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
            tf.addfile(info)
        else:
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(CifarflowError) as e:  # refused, or (an absolute path) kept inside and then no dataset
        datasets.load(archive)
    assert "cannot extract" in str(e.value) or member.startswith("/")
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/cifarflow-absolute-escape.txt").exists()
    assert not (tmp_path / "cache" / "escaped.txt").exists() and not (tmp_path / "cache" / "extracted" / "escaped.txt").exists()


def test_second_load_comes_from_the_npz_cache(folder_data, monkeypatch):
    first = datasets.load(folder_data)
    assert list((datasets.cache_root() / "arrays").glob("*.npz"))

    def no_decoding(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(datasets, "_load_root", no_decoding)
    second = datasets.load(folder_data)
    assert second.checksum == first.checksum
    np.testing.assert_array_equal(second.x_train, first.x_train)


def test_cache_is_invalidated_when_files_change(folder_data):
    first = datasets.load(folder_data)
    victim = next((folder_data / "train" / "cat").iterdir())
    shutil.copy(next((folder_data / "train" / "dog").iterdir()), victim)
    assert datasets.load(folder_data).checksum != first.checksum


def test_cifar10_prefers_the_environment_variable(folder_data, monkeypatch):
    monkeypatch.setenv("CIFARFLOW_DATA", str(folder_data))
    assert datasets.resolve_data_source("cifar10") == str(folder_data)
    assert datasets.load("cifar10").class_names == CLASSES3


def test_cifar10_then_uses_the_keras_cache(tmp_path):
    kdir = tmp_path / "keras_home" / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py"
    write_pickle_dir(kdir)
    assert datasets.resolve_data_source("cifar10") == str(kdir)
    assert len(datasets.load("cifar10").y_train) == 100


def test_cifar10_then_downloads_through_keras(monkeypatch):
    import keras

    x = np.zeros((4, 32, 32, 3), np.uint8)
    y = np.arange(4).reshape(-1, 1)
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: ((x, y), (x, y)))
    assert datasets.resolve_data_source("cifar10") == "download"
    ds = datasets.load("cifar10")
    assert ds.y_train.shape == (4,) and ds.source == "cifar10"  # reloadable; the Keras cache path once it exists


def test_failed_download_is_a_one_line_error(monkeypatch):
    import keras

    def offline():
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(CifarflowError, match="could not download CIFAR-10.*CIFARFLOW_DATA") as e:
        datasets.load("cifar10")
    assert "\n" not in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(CifarflowError, match=r"data source not found: .*nowhere \(pass --data"):
        datasets.load(tmp_path / "nowhere")


def test_unknown_layout(tmp_path):
    (tmp_path / "junk" / "a").mkdir(parents=True)
    with pytest.raises(CifarflowError, match="neither a cifar-10-batches-py"):
        datasets.load(tmp_path / "junk")


def test_unsupported_file(tmp_path):
    (tmp_path / "datasets.csv").write_text("x")
    with pytest.raises(CifarflowError, match="unsupported data file"):
        datasets.load(tmp_path / "datasets.csv")


def test_corrupt_archive(tmp_path):
    (tmp_path / "datasets.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CifarflowError, match="cannot extract .*corrupt or truncated") as e:
        datasets.load(tmp_path / "datasets.tar.gz")
    assert "\n" not in str(e.value)


def test_empty_class_folder(folder_data):
    (folder_data / "test" / "bird").mkdir()
    (folder_data / "train" / "bird").mkdir()
    with pytest.raises(CifarflowError, match=r"empty class folder .*bird"):
        datasets.load(folder_data)


def test_class_sets_must_match(folder_data):
    shutil.rmtree(folder_data / "test" / "ship")
    with pytest.raises(CifarflowError, match=r"only in train \['ship'\]"):
        datasets.load(folder_data)


def test_corrupt_images_are_named_or_skipped(folder_data):
    bad = [folder_data / "train" / "dog" / "0003.png", folder_data / "test" / "cat" / "0001.png"]
    for p in bad:
        p.write_bytes(b"not an image")
    with pytest.raises(CifarflowError, match=r"2 unreadable or corrupt image\(s\): .*0003\.png.*--skip-corrupt") as e:
        datasets.load(folder_data)
    assert "\n" not in str(e.value)
    ds = datasets.load(folder_data, skip_corrupt=True)
    assert len(ds.skipped_files) == 2 and len(ds.y_train) == 35 and len(ds.y_test) == 11
    assert sorted(ds.skipped_files) == sorted(map(str, bad))


def test_wrong_image_size_fails_unless_resize(folder_data):
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 20, 30)).save(folder_data / "train" / "cat" / "big.png")
    with pytest.raises(CifarflowError, match=r"big\.png is 40x30 pixels, not 32x32 .*--resize"):
        datasets.load(folder_data)
    ds = datasets.load(folder_data, resize=True)
    assert ds.x_train.shape == (37, 32, 32, 3)


def test_truncated_pickle_batch(tmp_path):
    write_pickle_dir(tmp_path / "p")
    (tmp_path / "p" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CifarflowError, match=r"cannot read .*data_batch_3"):
        datasets.load(tmp_path / "p")


def test_split_is_stratified_and_seeded():
    y = np.repeat(np.arange(5), 40)
    x = np.arange(len(y))[:, None]
    a = datasets.train_val_split(x, y, 0.25, seed=1)
    b = datasets.train_val_split(x, y, 0.25, seed=1)
    c = datasets.train_val_split(x, y, 0.25, seed=2)
    assert np.bincount(a[3]).tolist() == [10] * 5  # every class keeps its share
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.array_equal(a[2], c[2])
    assert set(a[0].ravel()).isdisjoint(a[2].ravel())


def test_split_rejects_bad_fraction():
    with pytest.raises(CifarflowError, match="val_fraction=1.5"):
        datasets.train_val_split(np.zeros((10, 1)), np.zeros(10, int), 1.5)


def test_limit_keeps_classes_balanced():
    y = np.repeat(np.arange(10), 100)
    x, y2 = datasets.limit_per_class(np.arange(1000), y, 50, seed=0)
    assert len(y2) == 50 and np.bincount(y2).tolist() == [5] * 10
