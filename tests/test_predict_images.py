"""Images in, labels out (issue 28): encoded JPEG/PNG images of any size and mode through the logged model's pyfunc,
`mlflow models serve`, `cifarflow predict` and an ensemble's pyfunc, decoded by the one function the training data
path uses, with the labels and probabilities of the decoded pixels; pixel arrays as before; bad input refused."""

from __future__ import annotations

import ast
import base64
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from conftest import CLASSES3, class_images, isolate, post, serving

NAMES = ("a.jpg", "b.png", "c_64x64.png", "d_gray.png")  # sorted: the order a folder is read in


def write_images(folder: Path) -> list[Path]:
    """A 32x32 JPEG, a 32x32 PNG, a 64x64 PNG and a 40x24 grayscale PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    imgs = class_images(4, 0, seed=3)
    big = np.kron(class_images(1, 1, seed=4)[0], np.ones((2, 2, 1), np.uint8))  # 64x64
    pictures = [Image.fromarray(imgs[0]), Image.fromarray(imgs[1]), Image.fromarray(big),
                Image.fromarray(class_images(1, 2, seed=5)[0][:24, :40, 0], mode="L")]
    for name, picture in zip(NAMES, pictures):
        picture.save(folder / name, quality=90) if name.endswith(".jpg") else picture.save(folder / name)
    return [folder / n for n in NAMES]


@pytest.fixture(scope="module")
def setup(trained_store, tmp_path_factory):
    """The session's tiny trained run, its pyfunc loaded once, four image files and the arrays the training data
    path decodes them to (a class-folder dataset of them, loaded with resize)."""
    from cifarflow.data import datasets

    root, result = trained_store
    tmp = tmp_path_factory.mktemp("predict_images")
    shutil.copyfile(root / "mlflow.db", tmp / "mlflow.db")
    files = write_images(tmp / "images")
    for split in ("train", "test"):
        shutil.copytree(tmp / "images", tmp / "tree" / split / "cat")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, tmp)
        model = mlflow.pyfunc.load_model(result.model_uri)
        ds = datasets.load(tmp / "tree", resize=True, use_cache=False)
    return {"result": result, "model": model, "files": files, "x": ds.x_test, "db": tmp / "mlflow.db"}


@pytest.fixture
def store(setup, tmp_path):
    """This test's MLflow store: a copy of the one holding the session's trained run."""
    shutil.copyfile(setup["db"], tmp_path / "mlflow.db")
    return setup


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def expected_probs(setup, x=None) -> np.ndarray:
    return np.asarray(setup["model"].predict((setup["x"] if x is None else x).astype(np.float32)))


def check_table(table: pd.DataFrame, probs: np.ndarray, classes=CLASSES3) -> None:
    assert list(table.columns[-len(classes) - 2:]) == ["label", "probability", *classes]
    np.testing.assert_allclose(table[list(classes)].to_numpy(np.float64), probs, rtol=0, atol=1e-6)
    assert list(table["label"]) == [classes[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(table["probability"].to_numpy(np.float64), probs.max(1), rtol=0, atol=1e-6)


def test_one_decoder_for_training_data_and_served_images(setup):
    from cifarflow import serving
    from cifarflow.data import datasets

    assert datasets.decode_image is serving.decode_image  # the training path calls the served model's decoder
    for path, x in zip(setup["files"], setup["x"]):
        assert serving.decode_image(path.read_bytes()).dtype == np.uint8
        np.testing.assert_array_equal(serving.decode_image(path.read_bytes()), x)
        np.testing.assert_array_equal(serving.decode_image(serving.image_bytes(b64(path))), x)
    gray = setup["x"][3]
    assert gray.shape == (32, 32, 3) and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    with pytest.raises(serving.ImageSizeError):
        serving.decode_image(setup["files"][2], resize=False)
    with pytest.raises(ValueError, match="not a readable image"):
        serving.decode_image(b"no image at all")


def test_class_names_recorded_and_defaulted(setup):
    from cifarflow import serving

    assert setup["model"].model_config["class_names"] == list(CLASSES3)
    assert serving.class_names_of({}, 10) == list(serving.CIFAR10_CLASSES)  # a model logged before they were recorded
    assert serving.class_names_of(None, 2) == ["class_0", "class_1"]


def test_pyfunc_takes_images_and_still_pixels(setup):
    model = setup["model"]
    probs = expected_probs(setup)
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32 and probs.shape == (4, 3)  # pixels as before
    check_table(model.predict(pd.DataFrame({"image": [b64(p) for p in setup["files"]]})), probs)
    check_table(model.predict(pd.DataFrame({"image": [p.read_bytes() for p in setup["files"]]})), probs)


@pytest.mark.parametrize("images,match", [
    (["JPEG", b"junk bytes"], r"row 1 of column 'image': not a readable image"),
    (["JPEG", "%%% not base64"], r"row 1 of column 'image': not base64"),
    ([], r"empty batch"),
    (["JPEG"] * 1025, r"1025 images in one batch, more than 1024"),
])
def test_pyfunc_refuses_bad_images_in_one_line(setup, images, match):
    jpeg = setup["files"][0].read_bytes()
    frame = pd.DataFrame({"image": pd.Series([jpeg if v == "JPEG" else v for v in images], dtype=object)})
    with pytest.raises(MlflowException, match=match) as e:
        setup["model"].predict(frame)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and "\n" not in str(e.value)


def test_logged_loader_stays_self_contained(store, tmp_path):
    """The logged code/cifarflow_serving.py, which also decodes images, imports cifarflow only in require_backend
    (the CLI's), so the model loads where cifarflow is not installed; Pillow is among its requirements."""
    folder = Path(mlflow.artifacts.download_artifacts(store["result"].model_uri, dst_path=str(tmp_path)))
    tree = ast.parse((folder / "code" / "cifarflow_serving.py").read_text())
    for fn in [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name != "require_backend"] + \
            [n for n in tree.body if not isinstance(n, ast.FunctionDef)]:
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("cifarflow"), ast.dump(node)
    assert any(line.startswith("pillow==") for line in (folder / "requirements.txt").read_text().splitlines())


def test_mlflow_models_serve_takes_base64_images(store, tmp_path):
    """A real `mlflow models serve` on 127.0.0.1: base64 JPEG/PNG bytes (dataframe_split and dataframe_records)
    answered with the labels and probabilities of the decoded pixels; junk bytes HTTP 400; pixel arrays as before."""
    probs = expected_probs(store)
    images = [b64(p) for p in store["files"]]
    with serving(["models", "serve", "-m", store["result"].model_uri, "--env-manager", "local"],
                 tmp_path / "serve.log", "/ping") as base:
        for payload in ({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}},
                        {"dataframe_records": [{"image": i} for i in images]}):
            status, body = post(f"{base}/invocations", json.dumps(payload).encode())
            assert status == 200, body[:500]
            check_table(pd.DataFrame(json.loads(body)["predictions"]), probs)
        junk = {"dataframe_split": {"columns": ["image"], "data": [[images[0]], [base64.b64encode(b"junk").decode()]]}}
        status, body = post(f"{base}/invocations", json.dumps(junk).encode())
        assert status == 400 and b"row 1" in body, (status, body[:500])
        status, body = post(f"{base}/invocations", json.dumps({"inputs": store["x"].tolist()}).encode())
        assert status == 200, body[:500]
        np.testing.assert_allclose(np.array(json.loads(body)["predictions"]), probs, rtol=0, atol=1e-6)
        status, _ = post(f"{base}/invocations", json.dumps({"inputs": [[1, 2, 3]]}).encode())
        assert status == 400


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from cifarflow.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_predict_writes_only_the_table_to_stdout(store, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(store["files"][0].parent, folder / "nested")
    code, out, err = run_cli(["predict", store["result"].run_id, str(folder), "--out", "-"], capsys)
    assert code == 0, err
    table = pd.read_csv(io.StringIO(out))  # nothing but the CSV on stdout
    assert list(table.columns) == ["path", "label", "probability", *CLASSES3]
    assert list(table["path"]) == [str(folder / "nested" / n) for n in NAMES]
    check_table(table, expected_probs(store))


def test_cli_predict_archives_formats_tta_and_registered_names(store, tmp_path, capsys):
    from cifarflow.deploy import registry
    from cifarflow.tracking import refs

    files = store["files"]
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tf:
        for f in files:
            tf.add(f, arcname=f"imgs/{f.name}")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as zf:
        for f in files:
            zf.write(f, arcname=f.name)
    ref = registry.register(refs.resolve_source(store["result"].run_id))  # NAME@challenger, as users name it
    probs = expected_probs(store)
    readers = {".csv": pd.read_csv, ".json": pd.read_json, ".parquet": pd.read_parquet}
    for source, suffix in ((tmp_path / "images.tar.gz", ".csv"), (tmp_path / "images.zip", ".json"),
                           (files[0].parent, ".parquet")):
        out = tmp_path / f"preds{suffix}"
        code, stdout, err = run_cli(["predict", f"{ref.name}@challenger", str(source), "--out", str(out)], capsys)
        assert code == 0, err
        assert stdout.strip() == f"4 images -> {out}"
        table = readers[suffix](out)
        assert [Path(p).name for p in table["path"]] == list(NAMES)
        check_table(table, probs)
    import cifarflow
    from cifarflow.deploy.pull import pull

    check_table(cifarflow.predict(f"models:/{ref.name}@challenger", [files[0].parent]), probs)  # the Python API
    pull(f"{ref.name}@challenger", "mlflow", tmp_path / "deploy")
    card = json.loads((tmp_path / "deploy" / "model_card.json").read_text())
    assert card["input"]["shape"] == [None, 32, 32, 3] and card["image_input"]["name"] == "image"  # both inputs
    assert card["image_input"]["max_rows"] == 1024 and card["classes"] == list(CLASSES3)
    flipped = (probs + expected_probs(store, store["x"][:, :, ::-1])) / 2
    code, out, err = run_cli(["predict", store["result"].model_uri, *map(str, files), "--tta", "flip",
                              "--batch-size", "3"], capsys)
    assert code == 0, err
    check_table(pd.read_csv(io.StringIO(out)), flipped)


def test_cli_predict_unreadable_files(store, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(store["files"][0].parent, folder)
    (folder / "b_junk.jpg").write_bytes(b"not a jpeg")
    run_id = store["result"].run_id
    code, out, err = run_cli(["predict", run_id, str(folder), "--out", str(tmp_path / "p.csv")], capsys)
    assert code == 2 and out == "" and not (tmp_path / "p.csv").exists()
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"unreadable image {folder / 'b_junk.jpg'}: not a readable image"), err
    assert lines[-1].startswith(f"error: 1 unreadable image(s), the first {folder / 'b_junk.jpg'}") and \
        "--skip-corrupt" in lines[-1], err
    code, out, err = run_cli(["predict", run_id, str(folder), "--skip-corrupt"], capsys)
    assert code == 0 and err.strip().splitlines() == [lines[0]], err
    table = pd.read_csv(io.StringIO(out))
    assert [Path(p).name for p in table["path"]] == list(NAMES)
    check_table(table, expected_probs(store))
    for argv, message in ((["predict", run_id, str(folder), "--out", "p.txt"], "unknown format '.txt'"),
                          (["predict", run_id, str(tmp_path / "nowhere")], "no such file or folder")):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_ensemble_pyfunc_takes_images(store, tmp_path, capsys):
    """`cifarflow ensemble`'s pyfunc (log_pyfunc, the logged voting.py) answers encoded images like one model,
    through mlflow.pyfunc and `cifarflow predict`."""
    from cifarflow.evaluation import voting
    from cifarflow.evaluation.ensemble import log_pyfunc

    keras_model = store["model"].get_raw_model()
    with mlflow.start_run():
        info = log_pyfunc([keras_model, keras_model], "soft", [1.0, 1.0], CLASSES3)
    ensemble = mlflow.pyfunc.load_model(info.model_uri)
    probs = expected_probs(store)
    pixel_probs = ensemble.predict(store["x"].astype(np.float32))
    np.testing.assert_allclose(pixel_probs, voting.combine([probs, probs]), atol=1e-6)
    check_table(ensemble.predict(pd.DataFrame({"image": [b64(p) for p in store["files"]]})), pixel_probs)
    with pytest.raises(MlflowException, match="row 0"):
        ensemble.predict(pd.DataFrame({"image": ["bm90IGFuIGltYWdl"]}))
    code, out, err = run_cli(["predict", info.model_uri, str(store["files"][0].parent)], capsys)
    assert code == 0, err
    check_table(pd.read_csv(io.StringIO(out)), pixel_probs)
