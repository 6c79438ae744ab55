"""Registration, the promotion gate both ways, and the registry's bad inputs."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from cnnflow.errors import CnnflowError
from cnnflow.evaluate import evaluate
from cnnflow.tracking import registry
from cnnflow.tracking.mlflow_tracker import stage_run


def _logged(model_dir):
    tracker = stage_run("train")
    tracker.log_model(model_dir)
    tracker.close()
    return tracker.run_id


def _alias(client, name, alias) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)  # int on sqlite


def test_promotion_gate_both_ways(tracking_uri, shards, model_dir, weak_model_dir, tmp_path):
    client = MlflowClient(tracking_uri)
    good = evaluate(model_dir, shards, tmp_path / "good")
    weak = evaluate(weak_model_dir, shards, tmp_path / "weak")
    assert good["accuracy"] > weak["accuracy"] + 0.05

    v1 = registry.register(_logged(weak_model_dir), "digits", metrics=weak)
    assert _alias(client, "digits", "challenger") == v1["version"]
    tags = client.get_model_version("digits", v1["version"]).tags
    assert float(tags["test.accuracy"]) == weak["accuracy"]
    assert tags["cnnflow.dataset_version"] == good["dataset_version"]
    first = registry.promote("digits")
    assert first["decision"] == "promoted" and first["champion_version"] is None

    v2 = registry.register(_logged(model_dir), "digits", metrics=good)
    better = registry.promote("digits", margin=0.01)
    assert better["decision"] == "promoted"
    assert (better["challenger_accuracy"], better["champion_accuracy"]) == (
        good["accuracy"], weak["accuracy"])
    assert _alias(client, "digits", "champion") == v2["version"]

    # a worse challenger: the champion stays, and the decision is recorded on the version
    v3 = registry.register(v1["model_uri"], "digits", metrics=weak)
    worse = registry.promote("digits")
    assert worse["decision"] == "kept"
    assert _alias(client, "digits", "champion") == v2["version"]
    recorded = client.get_model_version("digits", v3["version"]).tags
    assert recorded["cnnflow.promotion.decision"] == "kept"
    assert float(recorded["cnnflow.promotion.champion_accuracy"]) == good["accuracy"]

    # same model, better by less than the margin: kept
    registry.register(v2["model_uri"], "digits", metrics={"accuracy": good["accuracy"] + 0.001})
    assert registry.promote("digits", margin=0.002)["decision"] == "kept"


def test_other_dataset_keeps_champion_unless_allowed(tracking_uri, model_dir):
    run_id = _logged(model_dir)
    registry.register(run_id, "across", metrics={"accuracy": 0.5})
    registry.promote("across")
    other = {"cnnflow.dataset_version": "f" * 64}
    registry.register(run_id, "across", metrics={"accuracy": 0.9}, tags=other)
    assert registry.promote("across")["decision"] == "kept"
    assert registry.promote("across", promote_across_datasets=True)["decision"] == "promoted"


@pytest.mark.parametrize("name", ["a/b", "a:b", "", "../x", "x@y", " x"])
def test_invalid_model_name_is_one_line(server_uri, name):
    with pytest.raises(CnnflowError) as err:
        registry.register("runs:/0123456789abcdef0123456789abcdef/model", name)
    assert "\n" not in str(err.value) and "model name" in str(err.value)


def test_missing_things_are_one_line_errors(server_uri, model_dir):
    client = MlflowClient(server_uri)
    with pytest.raises(CnnflowError, match="no such model"):
        registry.register("models:/m-0000000000000000000000000000dead", "missing")
    with pytest.raises(CnnflowError, match="does not exist"):
        registry.promote("never-registered")
    registry.register(_logged(model_dir), "aliases", metrics={"accuracy": 0.5})
    with pytest.raises(CnnflowError, match="no version 99"):
        registry.set_alias(client, "aliases", "champion", 99)
    with pytest.raises(CnnflowError, match="no version 99"):
        registry.promote("aliases", version=99)
    with pytest.raises(CnnflowError, match="expected a 32-hex"):
        registry.resolve_model_uri("not-a-run")
