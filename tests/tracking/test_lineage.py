"""Lineage: every tag a stage run must carry, on the real server and on a sqlite store."""

from __future__ import annotations

import subprocess

import yaml
from mlflow import MlflowClient

from cnnflow.config import Params, flatten
from cnnflow.data.manifest import read_manifest
from cnnflow.tracking import lineage
from cnnflow.tracking.mlflow_tracker import end_parent_run, stage_run, start_parent_run


def _git_repo(path):
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / "a.txt").write_text("1\n")
    for args in (["add", "a.txt"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit",
                                    "-qm", "init"]):
        subprocess.run(["git", *args], cwd=path, check=True)


def test_git_info_reports_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    _git_repo(repo)
    clean = lineage.git_info(repo)
    assert len(clean["cnnflow.git_commit"]) == 40
    assert clean["cnnflow.git_dirty"] == "false"
    (repo / "a.txt").write_text("2\n")
    assert lineage.git_info(repo)["cnnflow.git_dirty"] == "true"


def test_git_info_without_a_repository_is_empty(tmp_path, monkeypatch):
    assert lineage.git_info(tmp_path) == {}  # tmp_path is not inside a git work tree
    monkeypatch.setenv("PATH", "")  # no git binary at all
    assert lineage.git_info(tmp_path) == {}


def test_dvc_lock_hash_changes_with_a_dependency(tmp_path):
    def lock(md5):
        stages = {"train": {"cmd": "x", "deps": [{"path": "data/shards", "md5": md5}],
                            "outs": [{"path": "outputs/train", "md5": "o1"}]}}
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))
        return lineage.dvc_lock_info("train", tmp_path / "dvc.lock")

    first, second = lock("aaa"), lock("bbb")
    assert first["cnnflow.dvc.deps.data/shards"] == "aaa"
    assert first["cnnflow.dvc.outs.outputs/train"] == "o1"
    assert first["cnnflow.dvc.lock_hash"] != second["cnnflow.dvc.lock_hash"]
    assert lineage.dvc_lock_info("missing", tmp_path / "dvc.lock") == {}
    assert lineage.dvc_lock_info("train", tmp_path / "nope.lock") == {}


def test_runner_is_detected_from_the_environment(monkeypatch):
    assert lineage.detect_runner() == "cli"
    monkeypatch.setenv("DVC_STAGE", "train")
    assert lineage.detect_runner() == "dvc"
    monkeypatch.setenv("KFP_RUN_ID", "run-1")
    assert lineage.detect_runner() == "kfp"
    monkeypatch.setenv("CNNFLOW_RUNNER", "kfp-local")
    assert lineage.detect_runner() == "kfp-local"


def test_stage_run_carries_every_lineage_tag(tracking_uri, shards, tmp_path, monkeypatch):
    _git_repo(tmp_path)  # the test's cwd: git commit + dirty flag come from here
    stages = {"train": {"deps": [{"path": "data/shards", "md5": "d1"}], "outs": []}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": stages}))
    monkeypatch.setenv("DVC_STAGE", "train")
    monkeypatch.setenv("KFP_RUN_ID", "kfp-run-42")
    monkeypatch.setenv("CNNFLOW_RUNNER", "kfp-local")
    version = read_manifest(shards)["dataset_version"]
    params = Params()

    parent = start_parent_run(experiment="lineage")
    assert start_parent_run(experiment="lineage") == parent  # resumed from the env var
    tracker = stage_run("train", params=flatten(params), dataset_version=version,
                        world_size=4, degrees={"dp": 2, "pp": 2, "fsdp": 1})
    tracker.log_dataset(shards, context="train")
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.log_metrics({"loss": 1.0}, step=2)
    tracker.close()
    end_parent_run(parent)

    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["cnnflow.runner"] == "kfp-local"
    assert tags["cnnflow.stage"] == "train"
    assert len(tags["cnnflow.git_commit"]) == 40
    assert tags["cnnflow.git_dirty"] == "false"  # dvc.lock is untracked: not dirty
    assert tags["cnnflow.dataset_version"] == version
    assert tags["cnnflow.dvc.stage"] == "train"
    assert tags["cnnflow.dvc.deps.data/shards"] == "d1"
    assert len(tags["cnnflow.dvc.lock_hash"]) == 64
    assert tags["cnnflow.kfp_run_id"] == "kfp-run-42"
    assert tags["cnnflow.world_size"] == "4"
    assert (tags["cnnflow.parallel.dp"], tags["cnnflow.parallel.pp"]) == ("2", "2")
    for key in ("cnnflow.torch", "cnnflow.host", "cnnflow.python", "cnnflow.mlflow"):
        assert tags[key]
    expected = lineage.stringify(flatten(params))
    assert run.data.params == expected  # the full resolved config, flattened
    assert run.info.status == "FINISHED"
    history = MlflowClient(tracking_uri).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == version[:36]
    assert "uint8" in dataset.dataset.schema
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "train"
    parent_run = MlflowClient(tracking_uri).get_run(parent)
    assert parent_run.data.tags["cnnflow.runner"] == "kfp-local"
    assert parent_run.data.tags["cnnflow.pipeline_key"] == "kfp-run-42"


def test_parent_run_is_found_again_by_kfp_run_id(tracking_uri, monkeypatch):
    monkeypatch.setenv("KFP_RUN_ID", "kfp-7")
    first = start_parent_run(experiment="kfp")
    monkeypatch.delenv("CNNFLOW_PARENT_RUN_ID")  # another component: a fresh process
    assert start_parent_run(experiment="kfp") == first
    child = stage_run("evaluate")
    assert MlflowClient(tracking_uri).get_run(child.run_id).data.tags[
        "mlflow.parentRunId"] == first
    child.close()
