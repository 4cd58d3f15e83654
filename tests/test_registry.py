"""Registry: register by run id, model URI and best-of; champion moves only on a policy-sized improvement on the same test set."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from cifarflow import tracking
from cifarflow.deploy import registry
from cifarflow.tracking import refs
from cifarflow.cli import main
from cifarflow.errors import CifarflowError

NAME = "cifarflow-cnn"  # registry/policy.yaml: cnn -> cifarflow-cnn


def twin_run(trained, test_accuracy: float, sha: str | None = None) -> str:
    """A finished run like ``trained`` (same logged model, recipe, dataset) with another test accuracy; its id."""
    tracking.configure()
    client = MlflowClient()
    source = client.get_run(trained.run_id)
    with mlflow.start_run(experiment_id=source.info.experiment_id) as run:
        mlflow.set_tags({**{k: v for k, v in source.data.tags.items() if k.startswith("cifarflow.")},
                         **({"cifarflow.dataset_sha256": sha} if sha else {})})
        mlflow.log_params({"model": "cnn"})
        mlflow.log_metrics({"test_accuracy": test_accuracy})
    return run.info.run_id


def aliases() -> dict[str, str]:
    return {a: str(v) for a, v in MlflowClient().get_registered_model(NAME).aliases.items()}


def test_register_a_run_as_challenger_with_description_and_tags(trained):
    ref = registry.register(refs.resolve_source(trained.run_id))
    assert (ref.name, ref.version, ref.run_id) == (NAME, "1", trained.run_id)
    mv = MlflowClient().get_model_version(NAME, "1")
    assert mv.aliases == ["challenger"] and mv.run_id == trained.run_id
    assert mv.tags["cifarflow.recipe"] == "cnn_small" and mv.tags["cifarflow.model_uri"] == trained.model_uri
    assert len(mv.tags["cifarflow.dataset_sha256"]) == 64 and mv.tags["cifarflow.dataset_sha256"] in mv.description
    assert float(mv.tags["metric.test_accuracy"]) == pytest.approx(trained.metrics["test_accuracy"])
    assert "test_accuracy=" in mv.description and "width=0.125" in mv.description


def test_register_by_model_uri_and_best_of_from_the_cli(trained, capsys):
    better = twin_run(trained, trained.metrics["test_accuracy"] + 0.01)  # tiny data may reach 1.0: always above it
    main(["register", trained.model_uri])
    main(["register", "--best-of", "cnn_small"])  # bare recipe name -> experiment cifarflow/cnn_small
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"registered {NAME} version 1 (alias challenger) from run {trained.run_id}")
    assert out[1].startswith(f"registered {NAME} version 2 (alias challenger) from run {better}")
    assert aliases() == {"challenger": "2"}


def test_champion_moves_only_on_improvement_by_the_margin(trained, capsys):
    acc = trained.metrics["test_accuracy"]
    main(["register", trained.run_id, "--promote"])  # no champion yet: the challenger becomes champion
    assert aliases() == {"challenger": "1", "champion": "1"}

    registry.register(refs.resolve_source(twin_run(trained, acc + 0.05)))  # v2: better by 0.05
    d = registry.promote(NAME)
    assert d.promoted and d.champion_before == "1" and aliases()["champion"] == "2"
    tags = MlflowClient().get_model_version(NAME, "2").tags
    assert tags["cifarflow.promotion.decision"] == "promoted"
    assert float(tags["cifarflow.promotion.challenger_value"]) == pytest.approx(acc + 0.05)
    assert float(tags["cifarflow.promotion.champion_value"]) == pytest.approx(acc)
    assert MlflowClient().get_model_version(NAME, "1").tags["cifarflow.promotion.replaced_by"] == "2"

    for version, value in (("3", acc + 0.05 + 0.001), ("4", acc - 0.1)):  # below the 0.002 margin; a regression
        registry.register(refs.resolve_source(twin_run(trained, value)))
        main(["promote", NAME])
        assert aliases() == {"champion": "2", "challenger": version}
        tags = MlflowClient().get_model_version(NAME, version).tags
        assert tags["cifarflow.promotion.decision"] == "rejected"
        assert float(tags["cifarflow.promotion.challenger_value"]) == pytest.approx(value)
        assert float(tags["cifarflow.promotion.champion_value"]) == pytest.approx(acc + 0.05)
    out = capsys.readouterr().out
    assert out.count(f"{NAME}: champion stays v2 (test_accuracy ") == 2 and "does not beat champion v2" in out


def test_no_promotion_across_different_test_sets_unless_forced(trained, capsys):
    registry.register(refs.resolve_source(trained.run_id))
    registry.promote(NAME)
    registry.register(refs.resolve_source(twin_run(trained, 1.0, sha="0" * 64)))
    with pytest.raises(SystemExit) as e:
        main(["promote", NAME])
    assert e.value.code == 2 and "error: cannot compare cifarflow-cnn v2 with champion v1: different test sets" in capsys.readouterr().err
    assert aliases()["champion"] == "1"
    assert MlflowClient().get_model_version(NAME, "2").tags["cifarflow.promotion.decision"] == "rejected"
    assert registry.promote(NAME, force=True).promoted and aliases()["champion"] == "2"
    assert MlflowClient().get_model_version(NAME, "2").tags["cifarflow.promotion.decision"] == "forced"


def test_policy_names_the_model_per_architecture(trained, tmp_path, monkeypatch):
    policy = tmp_path / "policy.yaml"
    policy.write_text("metric: test_accuracy\nmin_improvement: 0.01\nmodels:\n  resnet: cifarflow-resnet\n")
    monkeypatch.setenv("CIFARFLOW_POLICY", str(policy))
    source = refs.resolve_source(trained.run_id)
    with pytest.raises(CifarflowError, match="architecture 'cnn' has no registered model name"):
        registry.register(source)
    assert registry.register(source, name="my-cnn").name == "my-cnn"


@pytest.mark.parametrize("argv, message", [
    (["register"], "error: give exactly one of MODEL_URI, RUN_ID or --best-of EXPERIMENT"),
    (["register", "0" * 32], f"error: no run {'0' * 32}"),
    (["register", "models:/m-nope"], "error: no logged model models:/m-nope"),
    (["register", "--best-of", "nope"], "error: no experiment 'nope'"),
    (["promote", "nope"], "error: 'nope' has no challenger version"),
    (["pull", "nope@champion", "--dest", "out"], "error: no registered model version 'nope@champion'"),
])
def test_fixable_registry_errors_are_one_line(trained, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_the_policy_names_every_architecture():
    from cifarflow import models
    from cifarflow.deploy import registry

    assert set(models.BUILDERS) <= set(registry.load_policy().models)
