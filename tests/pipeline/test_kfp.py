"""The KFP layer: compiled pipeline, parameters, one component, kfp.local end to end, errors.

The end-to-end test runs the same pipeline `make run` runs (kfp.local, SubprocessRunner in
this environment) on a reduced configuration in a temp workspace: 2 epochs, 1 process per
pod, tracking to a temp sqlite store.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from cnnflow.config import Params, flatten, load_params
from cnnflow.configs.launch import LaunchConfig
from cnnflow.errors import CnnflowError, ConfigError
from cnnflow.kfp import components as comps
from cnnflow.kfp.params import decode, encode, kfp_name, to_arguments
from cnnflow.pipeline import compile_pipeline, run_local, submit
from cnnflow.tracking.provenance import PLACES

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "compiled" / "cnn_training.yaml"
STEPS = ("prepare", "shard", "train", "evaluate", "finish")
KFP_TYPES = {bool: "BOOLEAN", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING",
             list: "LIST"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "cnn_training.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    return {"pipeline": docs[0], "platform": docs[1], "text": path.read_text()}


def test_every_params_key_is_a_pipeline_parameter(spec):
    inputs = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    defaults = flatten(Params())
    assert set(inputs) == {kfp_name(k) for k in defaults} | {"workspace"}
    for key, default in defaults.items():
        declared = inputs[kfp_name(key)]
        assert declared["parameterType"] == KFP_TYPES[type(default)], key
        assert declared.get("defaultValue", default) == default, key
    assert inputs["workspace"]["defaultValue"] == "/workspace"


def test_platform_spec_mounts_the_pvc_in_every_step(spec):
    executors = spec["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{s}" for s in STEPS}
    for name, config in executors.items():
        (mount,) = config["pvcMount"]
        assert mount["mountPath"] == "/workspace", name
        assert mount["pvcNameParameter"]["componentInputParameter"].endswith(
            "launch_volume_claim"), name


def test_caching_retries_resources_and_env_per_step(spec):
    pipeline = spec["pipeline"]
    tasks = {**pipeline["root"]["dag"]["tasks"],
             **pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]}
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"prepare", "shard"}
    for step in STEPS:
        assert tasks[step]["retryPolicy"]["maxRetryCount"] >= 1, step
        container = pipeline["deploymentSpec"]["executors"][f"exec-{step}"]["container"]
        assert container["image"] == LaunchConfig().image
        assert container["resources"]["cpuRequest"] > 0
        assert container["resources"]["memoryLimit"] > 0
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == {"KFP_RUN_ID": "{{$.pipeline_job_uuid}}", "CNNFLOW_RUNNER": "kfp"}
        assert "pip install" not in " ".join(container["command"])  # install_kfp_package=False
    assert pipeline["root"]["dag"]["tasks"]["finish"]["triggerPolicy"]["strategy"] == \
        "ALL_UPSTREAM_TASKS_COMPLETED"  # the exit handler runs after a failure too
    # a run-specific input would give the cached steps a new cache key in every run
    for step in STEPS:
        inputs = pipeline["components"][f"comp-{step}"]["inputDefinitions"]["parameters"]
        assert ("kfp_run_id" in inputs) == (step not in cached), step


def test_the_local_variant_differs_only_in_runner_settings(tmp_path):
    from kfp import compiler

    from cnnflow.kfp.cnn_training import build_pipeline

    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_pipeline(local=True), str(path))
    local = next(yaml.safe_load_all(path.read_text()))
    executors = local["deploymentSpec"]["executors"]
    for step in STEPS:
        env = {e["name"]: e["value"] for e in executors[f"exec-{step}"]["container"]["env"]}
        assert env == {"CNNFLOW_RUNNER": "kfp-local"}
    assert "retryPolicy" not in str(local["root"])
    assert "retryPolicy" not in str(local["components"])


def test_committed_yaml_is_current(spec):
    assert COMPILED.is_file(), "run `cnnflow pipeline compile` and commit the YAML"
    assert COMPILED.read_text() == spec["text"], (
        "pipelines/compiled/cnn_training.yaml is stale: run `cnnflow pipeline compile`")


def test_components_are_thin():
    tree = ast.parse(Path(comps.__file__).read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
           for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top <= {"functools", "kfp"}
    for step in STEPS:
        component = getattr(comps, step)
        body = ast.parse(textwrap.dedent(inspect.getsource(component.python_func)))
        (func,) = [n for n in body.body if isinstance(n, ast.FunctionDef)]
        imports = [n for n in func.body if isinstance(n, ast.ImportFrom)]
        calls = [n for n in ast.walk(func) if isinstance(n, ast.Call)]
        assert [i.module for i in imports] == ["cnnflow.kfp.steps"], step
        assert len([c for c in calls if getattr(c.func, "id", "").endswith("_step")]) == 1
    assert LaunchConfig().image == comps.BASE_IMAGE


def test_params_survive_the_round_trip_as_the_runners_render_them():
    params = load_params(None, ["parallel.pp=2", "parallel.split_points=[stage2.0]",
                                "optim.lr=0.05", "prepare.path='a dir: with # chars'",
                                "train.augment=false", "launch.env=[A=1, B=x y]"])
    text = encode(to_arguments(params))
    assert decode(text) == params
    # kfp.local renders ints as floats, booleans in lower case, lists as JSON
    assert decode("prepare.seed=3.0\x1etrain.augment=true\x1eoptim.betas=[0.8, 0.9]") == \
        load_params(None, ["prepare.seed=3", "optim.betas=[0.8, 0.9]"])
    with pytest.raises(ConfigError, match=r"prepare\.seed"):
        decode("prepare.seed=abc")
    with pytest.raises(ConfigError, match="unknown"):
        decode("prepare.nope=1")


@pytest.fixture
def isolated_process(monkeypatch, tmp_path):
    """Steps chdir and export variables: restore both after an in-process call."""
    monkeypatch.chdir(tmp_path)
    for name in ("KFP_RUN_ID", "CNNFLOW_RUNNER", "CNNFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_prepare_component_writes_the_workspace_and_describes_it(isolated_process):
    from kfp import dsl

    ws = isolated_process / "ws"
    params = load_params(None, ["prepare.source=synthetic", "prepare.num_images=200",
                                "prepare.workers=1", "tracking.enabled=false"])
    dataset = dsl.Dataset(uri=str(isolated_process / "artifact"))
    os.environ["KFP_RUN_ID"] = "{{$.pipeline_job_uuid}}"  # as a backend that leaves it
    comps.prepare.python_func(params=encode(to_arguments(params), ["prepare", "tracking"]),
                              workspace=str(ws), dataset=dataset)
    meta = dataset.metadata
    assert meta["path"] == str(ws / "data" / "prepared")
    assert (ws / "data" / "prepared" / "train_images.npy").is_file()
    written = json.loads((ws / "data" / "prepared" / "dataset.json").read_text())
    assert json.loads((Path(dataset.path) / "dataset.json").read_text()) == written
    assert meta["dataset_version"] == written["version"]
    assert meta["train_count"] + meta["val_count"] + meta["test_count"] == 200
    assert os.environ["CNNFLOW_RUNNER"] == "kfp"
    assert "KFP_RUN_ID" not in os.environ  # an unresolved placeholder is not an id


STEP_LINE = re.compile(r"^\[(\d)/5\] (\w+) +(started|ok|FAILED)(?: +([\d.]+) s  (.*))?$")


@pytest.mark.slow
def test_pipeline_run_end_to_end_as_make_run_runs_it(tmp_path):
    """`cnnflow pipeline run` (what `make run` runs) in a fresh workspace: a line per step
    as it starts and ends with its key result, then the summary; kfp.local's log in a
    file; the model registered and every MLflow run closed under one parent."""
    from mlflow import MlflowClient

    ws = tmp_path / "ws"
    shutil.copytree(ROOT / "data" / "raw" / "digits", ws / "data" / "raw" / "digits")
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    commit = _git_checkout(ws)
    overrides = ["train.epochs=2", "launch.nproc_per_node=1", "tracking.experiment=kfp-e2e"]
    done = _cli("pipeline", "run", *[a for o in overrides for a in ("--set", o)], cwd=ws,
                timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) <= 40, done.stdout
    steps = [STEP_LINE.match(line) for line in lines[:10]]
    assert all(steps), lines[:10]
    assert [(m[2], m[3]) for m in steps] == [
        (s, state) for s in STEPS for state in ("started", "ok")]
    result = {m[2]: m[5] for m in steps if m[3] == "ok"}

    dataset = json.loads((ws / "data" / "prepared" / "dataset.json").read_text())
    counts = {s: dataset["splits"][s]["count"] for s in ("train", "val", "test")}
    assert result["prepare"] == (f"digits {dataset['version'][:12]}: train {counts['train']}, "
                                 f"val {counts['val']}, test {counts['test']}")
    manifest = json.loads((ws / "data" / "shards" / "manifest.json").read_text())
    n_shards = sum(len(v["shards"]) for v in manifest["splits"].values())
    assert result["shard"] == f"{n_shards} shards of {dataset['version'][:12]}"
    summary_files = list(ws.glob("runs/*/train/summary.json"))
    assert len(summary_files) == 1
    summary = json.loads(summary_files[0].read_text())
    last = summary["history"][-1]
    train = re.fullmatch(r"(\d+) steps, (\d+) samples/s, val accuracy ([\d.]+) \(job "
                         r"(\S+), ([\d.]+) s\)", result["train"])
    assert train, result["train"]
    assert int(train[1]) == summary["steps"] and train[4] == summary_files[0].parts[-3]
    assert int(train[2]) == round(last["samples_per_s"])
    assert float(train[3]) == pytest.approx(last["val_accuracy"], abs=5e-5)
    metrics = json.loads((ws / "reports" / "metrics.json").read_text())
    assert result["evaluate"] == (f"test accuracy {metrics['test.accuracy']:.4f}; cnnflow v1; "
                                  f"champion decision: promoted")

    assert lines[10].startswith("pipeline succeeded in ")
    wall, job = map(float, re.findall(r"([\d.]+) s", lines[10]))
    assert 0 < job < wall
    assert lines[11] == (f"  model    runs/{train[4]}/train/model.pt; registered cnnflow v1 "
                         f"@challenger; champion decision: promoted (no champion yet)")
    assert lines[12] == "  reports  reports/ (metrics.json, per_class.json, plots/)"
    log_name = re.fullmatch(r"  KFP log  (outputs/kfp/kfp-local-\w+\.log)", lines[-1])
    assert log_name, lines[-1]
    log_text = (ws / log_name[1]).read_text()
    assert "Executing task 'train'" in log_text and "Got executor_input" in log_text
    assert "Executing task" not in done.stdout
    # each step a fresh process that loaded only what it needs by its first line
    cold = dict(re.findall(r"step (\w+): started, cold start [\d.]+ s, loaded ([\w,]*)",
                           log_text))
    assert set(cold) == set(STEPS)
    for step in ("prepare", "shard", "finish"):
        assert "torch" not in cold[step].split(","), (step, cold[step])
    assert all(set(cold[s].split(",")) >= {"kfp", "mlflow"} for s in STEPS)

    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert [str(v.version) for v in client.search_model_versions("name='cnnflow'")] == ["1"]
    assert str(client.get_model_version_by_alias("cnnflow", "champion").version) == "1"
    experiment = client.get_experiment_by_name("kfp-e2e").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if r.data.tags.get("cnnflow.role") == "pipeline"]
    assert lines[13] == (f"  MLflow   experiment kfp-e2e, run {parent.info.run_id} in {uri}; "
                         f"browse it with `make mlflow-ui`")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cnnflow.runner"] == "kfp-local"
    assert parent.data.tags["cnnflow.pipeline_key"] == log_name[1].split("/")[-1][:-4]
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"prepare", "shard", "train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert all(r.data.tags["cnnflow.runner"] == "kfp-local" for r in children.values())
    report = next((ws / "outputs" / "kfp").glob("cnn-training-*/evaluate/report"))
    assert "Champion decision: **promoted**" in report.read_text()

    # the parent carries the result, under a readable name
    assert re.fullmatch(r"kfp-local-\d{8}-\d{4}-[0-9a-f]{8}", parent.info.run_name)
    assert parent.data.metrics["test/accuracy"] == metrics["test.accuracy"]
    assert parent.data.params["optim.lr"] == str(load_params(ws / "params.yaml").optim.lr)
    assert parent.data.tags["cnnflow.registered_version"] == "cnnflow/1"
    assert parent.data.tags["cnnflow.decision"] == "promoted"
    # code, data and runner on every stage run and on the registered version
    sha = hashlib.sha256((ws / "data" / "shards" / "manifest.json").read_bytes()).hexdigest()
    for run in children.values():
        assert run.data.tags["cnnflow.git_commit"] == commit, run.info.run_name
        assert run.data.tags["mlflow.source.git.commit"] == commit
        assert run.data.tags["mlflow.source.name"] == "cnnflow (kfp-local)"
    assert children["train"].data.tags["cnnflow.shards_sha256"] == sha
    assert children["evaluate"].data.tags["cnnflow.registered_version"] == "cnnflow/1"
    assert not {"dataset_version", "world_size", "torch", "parallel.dp"} & set(
        children["train"].data.tags)  # no unprefixed duplicates
    version = client.get_model_version("cnnflow", "1")
    assert version.tags["cnnflow.git_commit"] == commit
    assert version.tags["cnnflow.shards_sha256"] == sha
    assert version.tags["cnnflow.runner"] == "kfp-local"
    assert version.tags["cnnflow.world_size"] == "1"

    shown = _cli("lineage", "models:/cnnflow@champion", cwd=ws)
    assert shown.returncode == 0, shown.stderr
    defaults = flatten(Params())
    changed = {k: v for k, v in flatten(load_params(ws / "params.yaml", overrides)).items()
               if v != defaults[k] and not k.endswith(PLACES)}  # paths are the machine's
    assert changed == {"train.epochs": 2, "tracking.experiment": "kfp-e2e"}
    expected_rerun = f"git checkout {commit} && cnnflow pipeline run" + "".join(
        f" --set {k}={v}" for k, v in sorted(changed.items()))
    assert shown.stdout.splitlines() == [
        "model     cnnflow v1 (@challenger, @champion)",
        f"code      git {commit} (clean)",
        f"data      dataset {dataset['version']}",
        f"shards    manifest sha256 {sha}",
        "runner    kfp-local, world size 1 (dp 1, pp 1, fsdp 1)",
        f"metrics   test.accuracy {metrics['test.accuracy']:.4f}, test.macro_f1 "
        f"{metrics['test.macro_f1']:.4f}, test.ece {metrics['test.ece']:.4f}",
        f"runs      train {children['train'].info.run_id}, evaluate "
        f"{children['evaluate'].info.run_id}, pipeline {parent.info.run_id}",
        f"rerun     {expected_rerun}",
    ]


def _git_checkout(path: Path) -> str:
    """`path` as a git checkout of one commit (what `make run` runs in); its sha."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "cnnflow-test", "GIT_COMMITTER_NAME": "cnnflow-test",
           "GIT_AUTHOR_EMAIL": "test@cnnflow.invalid",
           "GIT_COMMITTER_EMAIL": "test@cnnflow.invalid"}
    for cmd in (["init", "-q", "-b", "main"], ["add", "params.yaml"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=path, env=env, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_a_failing_step_fails_the_run_with_its_own_one_line_error(tmp_path, monkeypatch):
    """kfp.local only says which task failed; the run's error repeats the step's line and
    names the log; the terminal shows no traceback and no SUCCESS after the failure."""
    import io

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("CNNFLOW_PARENT_RUN_ID", raising=False)
    missing = tmp_path / "no-such-dir"
    params = load_params(None, ["prepare.source=imagefolder", f"prepare.path={missing}"])
    terminal = io.StringIO()
    with pytest.raises(CnnflowError) as err:
        run_local(params, workspace=tmp_path / "ws", terminal=terminal)
    (log,) = (tmp_path / "ws" / "outputs" / "kfp").glob("kfp-local-*.log")
    error = (f"step prepare failed: {missing}: prepare.path for source 'imagefolder' is not "
             f"a directory")
    assert str(err.value) == f"kfp.local: {error} (log: {log})"
    shown = terminal.getvalue().splitlines()
    assert shown[0] == "[1/5] prepare  started"
    assert re.fullmatch(r"\[1/5\] prepare  FAILED +[\d.]+ s  " + re.escape(error), shown[1])
    assert "SUCCESS" not in terminal.getvalue() and "Traceback" not in terminal.getvalue()
    assert "Traceback" in log.read_text()  # the whole story is in the log
    assert not (tmp_path / "ws" / "data" / "prepared").exists()
    # the MLflow tree: the failed stage and its parent closed FAILED, naming the error
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnflow").experiment_id])
    assert sorted((r.info.run_name.split("-")[0], r.info.status) for r in runs) == [
        ("kfp", "FAILED"), ("prepare", "FAILED")]
    (child,) = [r for r in runs if r.info.run_name == "prepare"]
    (parent,) = [r for r in runs if r.info.run_name != "prepare"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["cnnflow.error"] == error.removeprefix("step prepare failed: ")
    assert parent.data.tags["cnnflow.error"] == child.data.tags["cnnflow.error"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_to_a_closed_port_fails_fast_naming_the_host():
    host = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(CnnflowError, match=f"KFP host {host} does not answer"):
        submit(Params(), host=host)
    assert time.monotonic() - start < 5


def test_submit_to_a_silent_host_times_out(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()  # accepts connections, never answers
    host = f"http://127.0.0.1:{server.getsockname()[1]}"
    held: list = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(CnnflowError, match="does not answer"):
            submit(Params(), host=host, timeout_s=1.0)
    finally:
        server.close()
    assert time.monotonic() - start < 4


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "CNNFLOW_PARENT_RUN_ID", "KFP_RUN_ID")}
    return subprocess.run([sys.executable, "-m", "cnnflow.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [["run"], ["submit", "--host", "http://127.0.0.1:9"]])
def test_cli_rejects_a_bad_parameter_in_one_line(command, tmp_path):
    done = _cli("pipeline", *command, "--set", "prepare.seed=abc", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "prepare.seed" in lines[0], done.stderr
    done = _cli("pipeline", *command, "--set", "prepare.sede=1", cwd=tmp_path)
    assert done.returncode == 2 and "prepare.sede" in done.stderr


def test_cli_submit_to_a_closed_port(tmp_path):
    host = f"http://127.0.0.1:{_closed_port()}"
    done = _cli("pipeline", "submit", "--host", host, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"cnnflow: error: KFP host {host} does not answer ([Errno 111] Connection refused)"]


def test_cli_compile_writes_the_yaml(tmp_path):
    done = _cli("pipeline", "compile", "--out", str(tmp_path / "p.yaml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.yaml").read_text() == COMPILED.read_text()
