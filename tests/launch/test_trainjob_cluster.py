"""TrainJobs on a cluster: the kubernetes backend against the in-process fake API server
(tests/launch/fake_apiserver.py), which stands in for the Kubernetes API, through the
real `kubernetes` client. The scenarios play the Trainer (JobSet pods, conditions) and
order their steps on the launcher's requests, never on sleeps."""

from __future__ import annotations

import pytest
import yaml
from kubernetes import client

from cnnflow.config import load_params, params_from_dict
from cnnflow.configs.launch import LaunchConfig
from cnnflow.launch import launch_training
from cnnflow.launch.kubernetes import LaunchError, launch_job
from cnnflow.launch.trainjob import render_trainjob

from .fake_apiserver import FakeCluster

FAST = {"poll_s": 0.05, "watch_s": 1}
TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/cnnflow/trainjobs"
RUNTIMES = "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes"


def _api(cluster: FakeCluster) -> client.ApiClient:
    return client.ApiClient(client.Configuration(host=cluster.url))


def _rendered(**cfg):
    cfg.setdefault("nodes", 2)
    return render_trainjob(LaunchConfig(kind="trainjob", **cfg), run_id="run-1",
                           params_yaml="train:\n  epochs: 1\n", parent_run_id="parent-1")


def _follow_path(job: dict, pod: str) -> str:
    return f"/api/v1/namespaces/{job['metadata']['namespace']}/pods/{pod}/log?follow"


def _succeeds(cluster: FakeCluster, job: dict) -> None:
    cluster.set_condition(job, "Created", "JobsCreationSucceeded", "created")
    pod = cluster.add_node_pod(job, 0, "Running")
    other = cluster.add_node_pod(job, 1, "Running")
    cluster.write_log(other, "rank 1 is not followed", done=True)
    cluster.write_log(pod, "epoch 1 loss 2.30")
    cluster.wait_for_request("GET", _follow_path(job, pod))  # followed while it runs
    cluster.write_log(pod, "epoch 2 loss 1.10", done=True)
    cluster.add_node_pod(job, 0, "Succeeded")
    cluster.set_condition(job, "Complete", "JobsCompleted", "TrainJob is completed")


def _fails(cluster: FakeCluster, job: dict) -> None:
    pod = cluster.add_node_pod(job, 0, "Running")
    cluster.write_log(pod, "RuntimeError: boom", done=True)
    cluster.add_node_pod(job, 0, "Failed")
    cluster.wait_for_request("GET", _follow_path(job, pod))
    cluster.set_condition(job, "Failed", "JobsFailed",
                          "jobset failed: job cnnflow/x-node-0 has failed (BackoffLimitExceeded)")


def _unschedulable(cluster: FakeCluster, job: dict) -> None:
    cluster.add_node_pod(job, 0, "Pending", scheduled=(
        "Unschedulable", "0/2 nodes are available: 2 Insufficient memory."))
    cluster.wait_for_request("GET", "/api/v1/namespaces/cnnflow/pods",
                             after=cluster.request_count())
    cluster.set_condition(job, "Failed", "DeadlineExceeded",
                          "TrainJob exceeded its activeDeadlineSeconds")


def test_success_streams_node0_log_and_deletes_the_job():
    lines: list[str] = []
    rendered = _rendered()
    with FakeCluster(_succeeds) as cluster:
        outcome = launch_job(rendered, api=_api(cluster), sink=lines.append, **FAST)
        assert outcome.succeeded and outcome.reason == "JobsCompleted"
        assert lines == ["[node-0] epoch 1 loss 2.30", "[node-0] epoch 2 loss 1.10"]
        assert cluster.names("TrainJob") == [] and cluster.names("ConfigMap") == []
        # the runtime was checked before the job was created, the job watched
        get_runtime = cluster.requests.index(("GET", f"{RUNTIMES}/torch-distributed"))
        assert get_runtime < cluster.requests.index(("POST", TRAINJOBS))
        assert ("GET", f"{TRAINJOBS}?watch") in cluster.requests
        added = next(e[3] for e in cluster.events if e[1] == "TrainJob")
        cm = next(e[3] for e in cluster.events if e[1] == "ConfigMap")
        owner = cm["metadata"]["ownerReferences"][0]
        assert owner == {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
                         "name": rendered.name, "uid": added["metadata"]["uid"],
                         "blockOwnerDeletion": False}
    spec = added["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert spec["trainer"]["numNodes"] == 2 and spec["activeDeadlineSeconds"] == 7200


def test_keep_job_leaves_it():
    rendered = _rendered()
    with FakeCluster(_succeeds) as cluster:
        launch_job(rendered, api=_api(cluster), keep=True, sink=lambda s: None, **FAST)
        assert cluster.names("TrainJob") == [rendered.name]
        assert cluster.names("ConfigMap") == [f"{rendered.name}-params"]


def test_failure_raises_the_jobs_own_reason_and_cleans_up():
    lines: list[str] = []
    rendered = _rendered()
    with FakeCluster(_fails) as cluster:
        with pytest.raises(LaunchError) as err:
            launch_job(rendered, api=_api(cluster), sink=lines.append, **FAST)
        assert str(err.value) == (f"TrainJob cnnflow/{rendered.name} failed: jobset failed: "
                                  "job cnnflow/x-node-0 has failed (BackoffLimitExceeded)")
        assert lines == ["[node-0] RuntimeError: boom"]
        assert cluster.names("TrainJob") == [] and cluster.names("ConfigMap") == []
        assert ("DELETE", f"{TRAINJOBS}/{rendered.name}") in cluster.requests


def test_deadline_exceeded_names_spec_active_deadline_and_the_pending_pod():
    rendered = _rendered(active_deadline_s=1)
    with FakeCluster(_unschedulable) as cluster:
        with pytest.raises(LaunchError) as err:
            launch_job(rendered, api=_api(cluster), sink=lambda s: None, **FAST)
        assert str(err.value) == (
            f"TrainJob cnnflow/{rendered.name} was stopped after spec.activeDeadlineSeconds=1"
            ": its node-0 pod was never scheduled (Unschedulable: 0/2 nodes are available: "
            "2 Insufficient memory.)")
        assert cluster.names("TrainJob") == []


def test_no_trainer_running_gives_up_after_the_deadline():
    rendered = _rendered(active_deadline_s=1)
    with FakeCluster(None) as cluster:
        with pytest.raises(LaunchError, match=r"shows no outcome after spec\."
                           r"activeDeadlineSeconds=1: no node-0 pod was ever scheduled "
                           r"\(is Kubeflow Trainer v2"):
            launch_job(rendered, api=_api(cluster), sink=lambda s: None,
                       deadline_grace_s=0.5, **FAST)
        assert cluster.names("TrainJob") == []


def test_unknown_runtime_is_one_line_naming_the_installed_ones():
    rendered = _rendered(runtime="torch-nightly")
    with FakeCluster(None, runtimes=("torch-distributed", "deepspeed-distributed")) as cluster:
        with pytest.raises(LaunchError) as err:
            launch_job(rendered, api=_api(cluster), **FAST)
        assert str(err.value) == ("launch.runtime 'torch-nightly' not found on the cluster; "
                                  "installed: deepspeed-distributed, torch-distributed")
        assert ("POST", TRAINJOBS) not in cluster.requests
        assert cluster.names("TrainJob") == [] and cluster.names("ConfigMap") == []


def test_cluster_without_trainer():
    with FakeCluster(None, no_crd=True) as cluster:
        with pytest.raises(LaunchError, match="clustertrainingruntimes is not served by .*"
                           "install Kubeflow Trainer v2"):
            launch_job(_rendered(), api=_api(cluster), **FAST)
        assert cluster.objects == {}


def test_launch_training_renders_a_trainjob_for_the_kubernetes_backend(tmp_path):
    params = load_params(None, ["launch.backend=kubernetes", "launch.kind=trainjob",
                                "launch.nodes=2", "optim.lr=0.05"])
    lines: list[str] = []
    with FakeCluster(_succeeds) as cluster:
        result = launch_training(params, shards=str(tmp_path / "data" / "shards"),
                                 workspace=tmp_path, run_id="r-7", api=_api(cluster),
                                 echo=lines.append)
        (cm,) = [o for _, kind, event, o in cluster.events
                 if kind == "ConfigMap" and event == "ADDED"]
        (job,) = [o for _, kind, event, o in cluster.events
                  if kind == "TrainJob" and event == "ADDED"]
    assert result.backend == "kubernetes" and "[node-0] epoch 2 loss 1.10" in lines
    final = params_from_dict(yaml.safe_load(cm["data"]["params.yaml"]))
    assert final.optim.lr == 0.05 and final.train.out_dir == result.out_dir
    assert job["spec"]["trainer"]["command"] == [
        "python", "-m", "cnnflow.train.torchrun", "-m", "cnnflow.train", "--params",
        "/etc/cnnflow/params.yaml"]
    env = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"] if "value" in e}
    assert env["CNNFLOW_IMAGE"] == "cnnflow:0.1.0" and env["HOME"] == "/tmp"
