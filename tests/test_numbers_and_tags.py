"""Numbers as people read them, full precision in the data; compare takes TTA and ECE from the newest
evaluation; registered versions carry only the tags a deployer needs (issue 16 items 4, 8, 9)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifarflow.deploy import pull, registry
from cifarflow.evaluation import compare, evaluator
from cifarflow.tracking import refs


@pytest.mark.slow
def test_compare_takes_tta_and_ece_from_the_newest_evaluation(trained, tmp_path):
    _, old = evaluator.evaluate(trained.run_id, tta="flip", fgsm_images=3)
    _, new = evaluator.evaluate(trained.run_id, tta="flip", fgsm_images=4)
    row = next(r for r in compare.collect() if r["run_id"] == trained.run_id)
    assert row["test_accuracy_tta"] == new["test_accuracy_tta"] and row["ece"] == new["ece"]


def test_the_table_is_rounded_and_the_csv_is_not(trained, tmp_path):
    run_id, rows = compare.compare(out=tmp_path / "cmp")
    row = rows[0]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    cells = dict(zip([c.strip() for c in table.splitlines()[0].strip("|").split("|")],
                     [c.strip() for c in table.splitlines()[2].strip("|").split("|")]))
    assert cells["train_seconds"] == f"{row['train_seconds']:.1f}"
    assert cells["images_per_second"] == f"{row['images_per_second']:,.0f}"
    assert re.fullmatch(r"\d\.\d{4}", cells["test_accuracy"])
    assert cells["param_count"] == f"{row['param_count']:,.0f}"
    raw = next(csv.DictReader((tmp_path / "cmp" / "comparison.csv").open()))
    assert float(raw["train_seconds"]) == row["train_seconds"]  # full precision in the data


def test_a_registered_version_keeps_only_deployer_tags(trained):
    ref = registry.register(refs.resolve_source(trained.run_id))
    registry.promote(ref.name)
    tags = MlflowClient().get_model_version(ref.name, ref.version).tags
    for key, value in tags.items():
        assert not value.startswith("/") and str(Path.cwd()) not in value, (key, value)
    assert tags["cifarflow.dataset_sha256"] and tags["cifarflow.source_run_id"] == trained.run_id
    assert float(tags["metric.test_accuracy"]) == trained.metrics["test_accuracy"]
    assert len(tags) <= 12, sorted(tags)


@pytest.mark.slow
def test_export_leaves_no_local_path_on_the_version_and_numbers_in_the_card(trained, tmp_path, capfd):
    from cifarflow.deploy import export

    ref = registry.register(refs.resolve_source(trained.run_id))
    registry.promote(ref.name)
    capfd.readouterr()
    results, run_id = export.export(f"{ref.name}@champion", ["onnx", "tflite"])
    out, err = capfd.readouterr()
    assert "XNNPACK" not in out + err and "Creating a new experiment" not in err, err[-2000:]
    tags = MlflowClient().get_model_version(ref.name, ref.version).tags
    assert tags["cifarflow.export.onnx.run_id"] == run_id
    assert not [k for k, v in tags.items() if v.startswith("/") or "export/" in v], tags
    pull.pull(f"{ref.name}@champion", "onnx", tmp_path / "deploy")
    card = json.loads((tmp_path / "deploy" / "model_card.json").read_text())
    onnx = next(r for r in results if r.kind == "onnx")
    assert card["export"]["max_abs_diff"] == onnx.max_abs_diff  # a number, at full precision
    assert card["export"]["size_bytes"] == onnx.size_bytes
