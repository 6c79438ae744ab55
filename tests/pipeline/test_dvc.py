"""`dvc repro` and `dvc exp run` on the real pipeline, in a temporary git repository.

The test copies the project's DVC files, params.yaml, the raw digits and the source tree
into a new git repository (identity set here), then drives the real `dvc` command line.
MLflow logs to a sqlite store in the temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict, check: bool = True,
         timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def _set(params: Path, dotted: str, value) -> None:
    data = yaml.safe_load(params.read_text())
    section, key = dotted.split(".")
    data[section][key] = value
    params.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repo holding the project's pipeline, with a reduced training config."""
    work = tmp_path_factory.mktemp("dvcrepo")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, work / name)
    (work / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", work / ".dvc" / "config")
    shutil.copytree(ROOT / "data" / "raw", work / "data" / "raw")
    shutil.copytree(ROOT / "src", work / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / ".gitignore").write_text("/mlflow/\n/remote/\n")
    params = work / "params.yaml"
    for dotted, value in (("train.epochs", 2), ("launch.nproc_per_node", 2),
                          ("model.width", 16), ("shard.workers", 1), ("prepare.workers", 1)):
        _set(params, dotted, value)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow' / 'mlflow.db'}",
           "GIT_AUTHOR_NAME": "cnnflow-test", "GIT_AUTHOR_EMAIL": "test@cnnflow.invalid",
           "GIT_COMMITTER_NAME": "cnnflow-test", "GIT_COMMITTER_EMAIL": "test@cnnflow.invalid"}
    (work / "mlflow").mkdir()
    _run(["git", "init", "-q", "-b", "main"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "pipeline"], work, env)
    return work, env


def _metrics(work: Path) -> dict:
    return json.loads((work / "reports" / "metrics.json").read_text())


def _exp_rows(work: Path, env: dict) -> dict[str, dict]:
    """{row name: {"params": params.yaml's values, "metrics": metrics.json's}} of
    `dvc exp show --json` (the baseline commit and each experiment)."""
    shown = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], work, env).stdout)
    rows = {}

    def add(entry: dict, name: str) -> None:
        data = entry.get("data") or {}
        rows[name] = {
            "params": ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {},
            "metrics": ((data.get("metrics") or {}).get("reports/metrics.json") or {}).get(
                "data") or {}}

    for entry in shown:
        if entry.get("rev") == "workspace":
            continue
        add(entry, entry.get("name") or entry["rev"])
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev, rev.get("name") or rev["rev"])
    return rows


def test_the_readme_sequence_repro_noop_experiment_show_and_diffs(repo):
    """The README's commands in its order: `dvc repro`, `dvc repro` again (nothing runs),
    `dvc exp run -S optim.lr=0.05 -S train.epochs=3` (train and evaluate only; logs, does
    not register), `dvc exp show`, then `dvc metrics diff && dvc plots diff`."""
    from mlflow import MlflowClient

    work, env = repo
    first = _run([str(BIN / "dvc"), "repro"], work, env)
    for stage in ("prepare", "shard", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (work / "outputs" / "train" / "model.pt").is_file()
    baseline = _metrics(work)
    assert 0.5 < baseline["test.accuracy"] <= 1
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "first repro"], work, env)

    again = _run([str(BIN / "dvc"), "repro"], work, env)
    assert "Data and pipelines are up to date" in again.stdout
    assert "Running stage" not in again.stdout

    # MLflow runs started by DVC carry the runner tag and dvc.lock hashes
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(client.get_experiment_by_name("cnnflow").experiment_id,
                              "tags.`cnnflow.runner` = 'dvc'")
    stages = sorted(r.data.tags["cnnflow.stage"] for r in runs
                    if r.data.tags.get("cnnflow.role") != "pipeline")
    assert stages == ["evaluate", "prepare", "shard", "train"]  # once each
    train = next(r for r in runs if r.data.tags.get("cnnflow.stage") == "train")
    ran_at = _run(["git", "rev-parse", "HEAD~1"], work, env).stdout.strip()
    assert train.data.tags["cnnflow.git_commit"] == ran_at
    assert train.data.tags["mlflow.source.git.commit"] == ran_at
    versions = {v.version for v in client.search_model_versions("name='cnnflow'")}
    challenger = client.get_model_version_by_alias("cnnflow", "challenger").version
    assert versions == {challenger}  # the repro registered its model

    exp = _run([str(BIN / "dvc"), "exp", "run", "-S", "optim.lr=0.05", "-S",
                "train.epochs=3"], work, env)
    assert "Stage 'prepare' didn't change" in exp.stdout
    assert "Stage 'shard' didn't change" in exp.stdout
    assert "Running stage 'train'" in exp.stdout
    assert "Running stage 'evaluate'" in exp.stdout
    # an experiment logs, it does not move the registry
    assert {v.version for v in client.search_model_versions("name='cnnflow'")} == versions
    assert client.get_model_version_by_alias("cnnflow", "challenger").version == challenger
    # its train run: the commit it ran at, and dvc.lock's entry for the stage as it stood
    train = client.search_runs(train.info.experiment_id, "tags.`cnnflow.stage` = 'train'",
                               order_by=["attributes.start_time DESC"])[0]
    head = _run(["git", "rev-parse", "HEAD"], work, env).stdout.strip()
    assert train.data.tags["cnnflow.git_commit"] == head
    assert any(k.startswith("cnnflow.dvc.") for k in train.data.tags), train.data.tags

    rows = _exp_rows(work, env)
    (row,) = [r for r in rows.values() if r["params"].get("optim", {}).get("lr") == 0.05]
    assert row["params"]["train"]["epochs"] == 3
    assert row["metrics"] == _metrics(work)  # the experiment's results, in the workspace
    assert all(isinstance(v, (int, float)) for v in row["metrics"].values())
    assert rows["main"]["metrics"] == baseline  # the baseline's metrics, from git

    diff = _run([str(BIN / "dvc"), "metrics", "diff", "--json"], work, env)
    diffed = json.loads(diff.stdout)["reports/metrics.json"]
    assert diffed["test.accuracy"]["old"] == baseline["test.accuracy"]
    assert diffed["test.accuracy"]["new"] == row["metrics"]["test.accuracy"]
    shown = _run([str(BIN / "dvc"), "metrics", "diff"], work, env)
    assert "test.accuracy" in shown.stdout and "failed to load" not in shown.stdout + \
        shown.stderr
    plots = _run([str(BIN / "dvc"), "plots", "diff", "-o", str(work / "plots-html")], work,
                 env)
    assert (work / "plots-html" / "index.html").is_file(), plots.stdout
    assert "failed to load" not in plots.stdout + plots.stderr
    # the training curves as an image: shown without Vega (offline)
    images = list((work / "plots-html").rglob("*training_curves.png"))
    assert images and all(i.read_bytes()[:4] == b"\x89PNG" for i in images)
    _run(["git", "checkout", "params.yaml", "dvc.lock", "reports"], work, env)
    _run([str(BIN / "dvc"), "checkout", "-f"], work, env)
    assert _metrics(work) == baseline


def test_bad_param_type_fails_with_the_cli_error_and_keeps_outputs(repo):
    work, env = repo
    before_model = (work / "outputs" / "train" / "model.pt").read_bytes()
    before_metrics = (work / "reports" / "metrics.json").read_text()
    proc = _run([str(BIN / "dvc"), "exp", "run", "-S", "train.epochs=abc"], work, env,
                check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "cnnflow: error: params.yaml: train.epochs: expected an int, got 'abc'" in out
    assert (work / "outputs" / "train" / "model.pt").read_bytes() == before_model
    assert (work / "reports" / "metrics.json").read_text() == before_metrics
    _run(["git", "checkout", "params.yaml"], work, env)


def test_push_pull_round_trip_through_a_local_remote(repo):
    work, env = repo
    remote = work / "remote"
    _run([str(BIN / "dvc"), "remote", "add", "-f", "-d", "local", str(remote)], work, env)
    _run([str(BIN / "dvc"), "push"], work, env)
    assert any(remote.rglob("*")), "nothing pushed"
    before = (work / "data" / "shards" / "manifest.json").read_text()
    model = (work / "outputs" / "train" / "model.pt").read_bytes()
    shutil.rmtree(work / ".dvc" / "cache")
    shutil.rmtree(work / "data" / "shards")
    (work / "outputs" / "train" / "model.pt").unlink()
    _run([str(BIN / "dvc"), "pull"], work, env)
    assert (work / "data" / "shards" / "manifest.json").read_text() == before
    assert (work / "outputs" / "train" / "model.pt").read_bytes() == model
    _run([str(BIN / "cnnflow"), "verify", "data/shards"], work, env)


def test_every_run_is_closed_and_under_its_invocations_parent(repo):
    """After the repros, the experiment and the failed run above: no RUNNING run; one parent
    per dvc invocation; each stage run under one; the failure named on run and parent."""
    from mlflow import MlflowClient

    work, env = repo
    # a run that fails once it has started: shards of another dataset version than asked
    failing = _run([str(BIN / "dvc"), "exp", "run", "-S", "train.dataset_version=0123456789ab"],
                   work, env, check=False)
    assert failing.returncode != 0
    _run(["git", "checkout", "params.yaml"], work, env)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cnnflow")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("cnnflow.role") == "pipeline"}
    assert all(p.data.tags["cnnflow.pipeline_key"].startswith("dvc-") for p in parents.values())
    stages = [r for r in runs if r.info.run_id not in parents]
    assert stages and all(r.data.tags.get("mlflow.parentRunId") in parents for r in stages)
    # 1 repro that ran stages, 1 experiment, 1 failed experiment; the no-op repro and the
    # bad value (refused before any run) have none
    assert len(parents) == len({r.data.tags["mlflow.parentRunId"] for r in stages}) == 3
    failed = [r for r in stages if r.info.status == "FAILED"]
    assert [r.data.tags["cnnflow.stage"] for r in failed] == ["train"]
    assert failed[0].data.tags["cnnflow.error"].startswith(
        "train.dataset_version=0123456789ab: the shards in ")
    parent = parents[failed[0].data.tags["mlflow.parentRunId"]]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["cnnflow.error"] == failed[0].data.tags["cnnflow.error"]
    finished = [p for p in parents.values() if p.info.status == "FINISHED"]
    assert all(0 < p.data.metrics["test/accuracy"] <= 1 for p in finished)
