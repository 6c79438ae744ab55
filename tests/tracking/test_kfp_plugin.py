"""KFP's MLflow plugin (KFP 2.17, KEP-12862): the backend owns the parent run and a nested
run per task, and sets MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID and MLFLOW_RUN_ID in each
step. The tests build that tree on the real MLflow server the way the backend does
(MlflowClient: a parent run tagged `kfp.pipeline_run_id`, a task run per step tagged
`mlflow.parentRunId`, both left RUNNING, as the backend closes them itself), set the
variables, and run cnnflow as a step would: a stage's run is a child of its task run,
no parent of cnnflow's own appears anywhere, and every run cnnflow opened is FINISHED;
the backend's runs are still RUNNING (its launcher and API server close them).

The train step runs with launch.backend=kubernetes against the in-process fake API
server (tests/launch/fake_apiserver.py, through the real kubernetes client); its
"operator" runs the master pod as a process with exactly the job's container env and
params ConfigMap, and nothing of the step's environment, so the pod reaches the tree
only through what the train step put into the job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from cnnflow.config import load_params
from cnnflow.kfp.params import encode, to_arguments
from tests.cli import cnnflow
from tests.launch.fake_apiserver import FakeCluster

IMAGE = "registry.example/team/cnnflow:1.2"


class Artifact:
    """What a KFP artifact is to a step: a path and metadata."""

    def __init__(self, where: Path, **metadata) -> None:
        self.path, self.metadata = str(where), dict(metadata)

    def log_metric(self, key: str, value: float) -> None:
        self.metadata[key] = value


@pytest.fixture
def kfp_backend(server_uri, monkeypatch):
    """A KFP run's MLflow tree as the backend makes it; `task(name)` opens a task run and
    sets the step's variables to it."""
    from mlflow import MlflowClient

    for name in ("MLFLOW_RUN_ID", "MLFLOW_WORKSPACE", "MLFLOW_TRACKING_AUTH",
                 "MLFLOW_TRACKING_TOKEN", "KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    client = MlflowClient(server_uri)
    experiment = client.create_experiment(f"kfp-plugin-{uuid.uuid4().hex[:8]}")
    kfp_run = str(uuid.uuid4())
    parent = client.create_run(experiment, run_name="cnn-training",
                               tags={"kfp.pipeline_run_id": kfp_run}).info.run_id
    before = _all_runs(client)

    class Backend:
        def task(self, name: str) -> str:
            run = client.create_run(experiment, run_name=name,
                                    tags={"mlflow.parentRunId": parent})
            monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
            monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
            monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
            return run.info.run_id

        def new_runs(self) -> dict[str, object]:
            return {r.info.run_id: r for r in _all_runs(client).values()
                    if r.info.run_id not in before}

    backend = Backend()
    backend.client, backend.uri, backend.experiment = client, server_uri, experiment
    backend.parent, backend.kfp_run = parent, kfp_run
    return backend


def _all_runs(client) -> dict[str, object]:
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r for r in client.search_runs(ids, max_results=5000)}


def test_a_stage_logs_as_a_child_of_the_kfp_task_run(kfp_backend, tmp_path):
    task = kfp_backend.task("prepare")
    done = cnnflow("prepare", "--set", "prepare.source=synthetic", "--set",
                   "prepare.num_images=200", "--set", "prepare.workers=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    new = kfp_backend.new_runs()
    (stage,) = [r for r in new.values() if r.info.run_id != task]
    assert set(new) == {task, stage.info.run_id}  # no parent of cnnflow's own
    assert stage.info.run_name == "prepare"
    assert stage.info.experiment_id == kfp_backend.experiment
    assert stage.data.tags["mlflow.parentRunId"] == task
    assert stage.info.status == "FINISHED"
    assert stage.data.metrics["train_count"] + stage.data.metrics["val_count"] + \
        stage.data.metrics["test_count"] == 200
    assert stage.data.params["prepare.num_images"] == "200"
    client = kfp_backend.client
    assert client.get_run(task).info.status == "RUNNING"  # the KFP launcher closes it
    assert client.get_run(kfp_backend.parent).info.status == "RUNNING"


def test_an_unknown_task_run_is_one_line_naming_it_and_the_server(kfp_backend, tmp_path):
    kfp_backend.task("prepare")
    missing = uuid.uuid4().hex
    os.environ["MLFLOW_RUN_ID"] = missing  # kfp_backend's monkeypatch restores these
    done = cnnflow("prepare", "--set", "prepare.source=synthetic", "--set",
                   "prepare.num_images=200", "--set", "prepare.workers=1", cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"cnnflow: error: MLFLOW_RUN_ID={missing}: no such run at "
                           f"{kfp_backend.uri} ("), line
    assert not (tmp_path / "data" / "prepared").exists()

    task = kfp_backend.task("prepare")
    other = kfp_backend.client.create_experiment(f"kfp-other-{uuid.uuid4().hex[:8]}")
    os.environ["MLFLOW_EXPERIMENT_ID"] = other
    done = cnnflow("prepare", "--set", "prepare.source=synthetic", "--set",
                   "prepare.num_images=200", "--set", "prepare.workers=1", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"cnnflow: error: MLFLOW_RUN_ID={task} is in experiment {kfp_backend.experiment} at "
        f"{kfp_backend.uri}, not MLFLOW_EXPERIMENT_ID={other}"]
    assert not (tmp_path / "data" / "prepared").exists()


def _kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters: [{{name: fake, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: me, user: {token: t}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: me}}]\n")
    return path


def _operator(pod_dir: Path, seen: dict):
    """Plays the training operator: runs the master pod with the job's env and params."""

    def play(cluster: FakeCluster, job: dict) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        with cluster.cond:
            cluster.cond.wait_for(lambda: cluster.stopping or (
                "ConfigMap", ns, f"{name}-params") in cluster.objects, timeout=60)
        text = cluster.get("ConfigMap", ns, f"{name}-params")["data"]["params.yaml"]
        (pod_dir / "params.yaml").write_text(text)
        (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "containers"]
        seen.update(job=job, container=container)
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env.update(PATH=os.environ["PATH"], PYTHONPATH=os.environ.get("PYTHONPATH", ""),
                   RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT="29500")
        args = [str(pod_dir / "params.yaml") if a.endswith("/params.yaml") else a
                for a in container["args"]]
        cluster.set_condition(job, "Created", "PyTorchJobCreated", "created")
        pod = cluster.add_pod(job, "master", 0, "Running")
        cluster.set_condition(job, "Running", "PyTorchJobRunning", "running")
        done = subprocess.run([sys.executable, *args], env=env, cwd=pod_dir,
                              capture_output=True, text=True, timeout=300)
        cluster.write_log(pod, *done.stdout.splitlines()[-2:], done=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-1500:])
        cluster.add_pod(job, "master", 0, "Succeeded")
        cluster.set_condition(job, "Succeeded", "PyTorchJobSucceeded", "completed")

    return play


@pytest.mark.slow
def test_the_training_pods_and_evaluate_log_into_the_kfp_tree(kfp_backend, shards, tmp_path,
                                                              monkeypatch):
    from cnnflow.data.manifest import read_manifest
    from cnnflow.kfp import components as comps

    ws = tmp_path / "ws"
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    model_name = f"kfp-plugin-{uuid.uuid4().hex[:8]}"
    params = load_params(None, [
        "launch.backend=kubernetes", f"launch.image={IMAGE}", f"launch.mount_path={ws}",
        "launch.nproc_per_node=1", "train.epochs=1", "train.max_steps=3",
        f"tracking.model_name={model_name}", "evaluate.batch_size=256"])
    text = encode(to_arguments(params))
    version = read_manifest(shards)["dataset_version"]
    shards_in = Artifact(tmp_path / "shards-artifact", path=str(shards),
                         dataset_version=version)
    model = Artifact(tmp_path / "model-artifact")
    seen: dict = {}
    train_task = kfp_backend.task("train")
    with FakeCluster(_operator(pod_dir, seen)) as cluster:
        monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "kubeconfig", cluster.url)))
        monkeypatch.chdir(tmp_path)
        comps.train.python_func(params=text, workspace=str(ws), kfp_run_id=kfp_backend.kfp_run,
                                shards=shards_in, model=model)
    env = {e["name"]: e["value"] for e in seen["container"]["env"] if "value" in e}
    assert env["CNNFLOW_PARENT_RUN_ID"] == train_task  # the job's only MLflow channel
    assert "MLFLOW_RUN_ID" not in env and "MLFLOW_TRACKING_URI" not in env
    assert seen["container"]["image"] == IMAGE
    pod_params = yaml.safe_load((pod_dir / "params.yaml").read_text())
    assert pod_params["tracking"]["uri"] == kfp_backend.uri

    evaluate_task = kfp_backend.task("evaluate")
    metrics, report = Artifact(tmp_path / "metrics"), Artifact(tmp_path / "report.md")
    decision = comps.evaluate.python_func(params=text, workspace=str(ws),
                                          kfp_run_id=kfp_backend.kfp_run, shards=shards_in,
                                          model=model, metrics=metrics, report=report)
    assert decision == "promoted"
    finish_task = kfp_backend.task("finish")
    status = comps.finish.python_func(params=encode(to_arguments(params), ["tracking", "launch"]),
                                      workspace=str(ws), kfp_run_id=kfp_backend.kfp_run,
                                      status=type("S", (), {"state": "SUCCEEDED",
                                                            "error_message": ""})())
    assert status == "FINISHED"

    new = kfp_backend.new_runs()
    tasks = {train_task: "train", evaluate_task: "evaluate", finish_task: "finish"}
    stages = {r.info.run_name: r for r in new.values() if r.info.run_id not in tasks}
    assert set(stages) == {"train", "evaluate"}  # no cnnflow parent, nothing else
    assert stages["train"].data.tags["mlflow.parentRunId"] == train_task
    assert stages["evaluate"].data.tags["mlflow.parentRunId"] == evaluate_task
    for run in stages.values():
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.info.experiment_id == kfp_backend.experiment
    train = stages["train"]
    assert train.data.tags["cnnflow.image"] == IMAGE
    assert train.data.tags["cnnflow.kfp_run_id"] == kfp_backend.kfp_run
    assert train.data.metrics["train/step_loss"] > 0
    assert model.metadata["train_run_id"] == train.info.run_id
    assert stages["evaluate"].data.metrics["test/accuracy"] == metrics.metadata["accuracy"]
    for run_id in (*tasks, kfp_backend.parent):  # the backend closes these
        assert kfp_backend.client.get_run(run_id).info.status == "RUNNING"

    parent = kfp_backend.client.get_run(kfp_backend.parent)
    assert parent.data.metrics["test/accuracy"] == metrics.metadata["accuracy"]
    assert parent.data.tags["cnnflow.registered_version"] == f"{model_name}/1"
    assert report.metadata["mlflow_parent_run_id"] == kfp_backend.parent
    (mv,) = kfp_backend.client.search_model_versions(f"name='{model_name}'")
    assert mv.tags["cnnflow.image"] == IMAGE
    assert mv.tags["cnnflow.train_run_id"] == train.info.run_id


def test_the_job_carries_the_workspace_and_auth_provider_never_credentials(monkeypatch):
    from cnnflow.launch import plan_job

    monkeypatch.setenv("MLFLOW_RUN_ID", "a" * 32)
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "kubernetes-namespaced")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret-token")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret-password")
    params = load_params(None, ["launch.backend=kubernetes"])
    rendered, _, _ = plan_job(params, shards="/workspace/data/shards", run_id="r",
                              parent_run_id="a" * 32, pod_view=True)
    text = rendered.to_yaml()
    assert "secret-" not in text
    (container,) = rendered.documents()[-1]["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["MLFLOW_WORKSPACE"] == "team-a"
    assert env["MLFLOW_TRACKING_AUTH"] == "kubernetes-namespaced"
    assert env["CNNFLOW_PARENT_RUN_ID"] == "a" * 32
    # credentials never as values: only MLflow's login, as optional secretKeyRefs
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
            if "valueFrom" in e and e["name"].startswith("MLFLOW_")}
    assert refs == {"MLFLOW_TRACKING_USERNAME": "mlflow-client",
                    "MLFLOW_TRACKING_PASSWORD": "mlflow-client"}
    assert not {"MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"} & set(env)


def test_launch_render_in_a_plugin_step_nests_the_job_under_the_task_run(tmp_path):
    """`cnnflow launch render` (and `launch train`) run by hand in a step that KFP's plugin
    gave MLFLOW_RUN_ID: the job's runs go under that task run, as the train step's do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNNFLOW_", "KFP_"))}
    cli = str(Path(sys.executable).with_name("cnnflow"))
    for extra, parent in (({"MLFLOW_RUN_ID": "b" * 32, "CNNFLOW_PARENT_RUN_ID": "c" * 32},
                           "b" * 32), ({"CNNFLOW_PARENT_RUN_ID": "c" * 32}, "c" * 32)):
        done = subprocess.run([cli, "launch", "render", "--run-id", "r"], cwd=tmp_path,
                              env={**env, **extra}, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        job = list(yaml.safe_load_all(done.stdout))[-1]
        (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "containers"]
        values = {e["name"]: e.get("value") for e in container["env"]}
        assert values["CNNFLOW_PARENT_RUN_ID"] == parent
        assert "MLFLOW_RUN_ID" not in values
