"""The kubernetes backend against an in-process fake API server (tests/launch/fake_apiserver.py).

The fake is a small http.server on 127.0.0.1:0 speaking the API server's JSON for the
custom-object, watch, ConfigMap, pod-list and pod-log endpoints; the launcher talks to
it through the REAL `kubernetes` client (`kubernetes.client.Configuration(host=...)`), so
request paths, watch streaming, error bodies and deserialisation are all exercised.
"""

from __future__ import annotations

import time

import pytest
import yaml
from kubernetes import client

from cnnflow.config import load_params, params_from_dict
from cnnflow.configs.launch import LaunchConfig
from cnnflow.launch import launch_training
from cnnflow.launch.kubernetes import LaunchError, api_client, launch_job
from cnnflow.launch.pytorchjob import render_job

from .fake_apiserver import FakeCluster

FAST = {"poll_s": 0.05, "watch_s": 1}


def _api(cluster: FakeCluster) -> client.ApiClient:
    return client.ApiClient(client.Configuration(host=cluster.url))


def _rendered(**cfg):
    cfg.setdefault("nodes", 2)
    return render_job(LaunchConfig(**cfg), run_id="run-1", params_yaml="train:\n  epochs: 1\n",
                      parent_run_id="parent-1")


# The scenarios below play the operator. They order their steps on the launcher's requests
# (FakeCluster.wait_for_request), never on sleeps: the job ends only once the launcher has
# done what the test then checks (followed the master log, looked at the pending pod).


def _follow_path(job: dict, pod: str) -> str:
    return f"/api/v1/namespaces/{job['metadata']['namespace']}/pods/{pod}/log?follow"


def _succeeds(cluster: FakeCluster, job: dict) -> None:
    cluster.set_condition(job, "Created", "PyTorchJobCreated", "created")
    pod = cluster.add_pod(job, "master", 0, "Running")
    cluster.add_pod(job, "worker", 0, "Running")
    cluster.set_condition(job, "Running", "PyTorchJobRunning", "running")
    cluster.write_log(pod, "epoch 1 loss 2.30")
    # the second line is written while the launcher follows the log, not before
    cluster.wait_for_request("GET", _follow_path(job, pod))
    cluster.write_log(pod, "epoch 2 loss 1.10", done=True)
    cluster.add_pod(job, "master", 0, "Succeeded")
    cluster.set_condition(job, "Succeeded", "PyTorchJobSucceeded",
                          "PyTorchJob cnnflow/x successfully completed.")


def _fails(cluster: FakeCluster, job: dict) -> None:
    name = job["metadata"]["name"]
    pod = cluster.add_pod(job, "master", 0, "Running")
    cluster.write_log(pod, "Traceback (most recent call last):", "RuntimeError: boom",
                      done=True)
    cluster.add_pod(job, "master", 0, "Failed")
    cluster.wait_for_request("GET", _follow_path(job, pod))  # the launcher reads the log
    cluster.set_condition(job, "Failed", "PyTorchJobFailed",
                          f"PyTorchJob cnnflow/{name} is failed because 1 Master replica(s) "
                          "failed.")


def _unschedulable(cluster: FakeCluster, job: dict) -> None:
    """The operator stops a job whose master pod never got a node at its deadline. What
    matters to the launcher is the order, not the clock: it has seen the pending pod (a pod
    list sent after the pod exists; the launcher joins that list's thread before it reports)
    when the DeadlineExceeded condition arrives."""
    cluster.add_pod(job, "master", 0, "Pending", scheduled=(
        "Unschedulable", "0/3 nodes are available: 3 Insufficient cpu."))
    cluster.wait_for_request("GET", f"/api/v1/namespaces/{job['metadata']['namespace']}/pods",
                             after=cluster.request_count())
    cluster.set_condition(job, "Failed", "DeadlineExceeded", "PyTorchJob x has failed "
                          "because it was active longer than specified deadline")


def test_success_streams_master_log_and_deletes_job():
    lines: list[str] = []
    rendered = _rendered()
    with FakeCluster(_succeeds) as cluster:
        outcome = launch_job(rendered, api=_api(cluster), sink=lines.append, **FAST)
        assert outcome.succeeded and outcome.reason == "PyTorchJobSucceeded"
        assert lines == ["[master-0] epoch 1 loss 2.30", "[master-0] epoch 2 loss 1.10"]
        # keep_job false: the job and its params ConfigMap are gone
        assert cluster.names("PyTorchJob") == [] and cluster.names("ConfigMap") == []
        created = [e for e in cluster.events if e[2] == "ADDED" and e[1] == "ConfigMap"]
        owner = created[0][3]["metadata"]["ownerReferences"][0]
        job_added = next(e[3] for e in cluster.events if e[1] == "PyTorchJob")
        assert owner["kind"] == "PyTorchJob" and owner["uid"] == job_added["metadata"]["uid"]
        assert ("GET", "/apis/kubeflow.org/v1/namespaces/cnnflow/pytorchjobs?watch"
                ) in cluster.requests


def test_keep_job_leaves_it_on_the_cluster():
    rendered = _rendered()
    with FakeCluster(_succeeds) as cluster:
        launch_job(rendered, api=_api(cluster), keep=True, sink=lambda s: None, **FAST)
        assert cluster.names("PyTorchJob") == [rendered.name]
        assert cluster.names("ConfigMap") == [f"{rendered.name}-params"]


def test_failure_raises_the_operators_reason_and_cleans_up():
    lines: list[str] = []
    rendered = _rendered()
    with FakeCluster(_fails) as cluster:
        with pytest.raises(LaunchError) as err:
            launch_job(rendered, api=_api(cluster), sink=lines.append, **FAST)
        assert str(err.value) == (f"PyTorchJob cnnflow/{rendered.name} failed: PyTorchJob "
                                  f"cnnflow/{rendered.name} is failed because 1 Master "
                                  "replica(s) failed.")
        assert "[master-0] RuntimeError: boom" in lines
        assert cluster.names("PyTorchJob") == [] and cluster.names("ConfigMap") == []


def test_never_scheduled_job_fails_at_the_deadline_naming_it():
    rendered = _rendered(active_deadline_s=1)
    with FakeCluster(_unschedulable) as cluster:
        with pytest.raises(LaunchError) as err:
            launch_job(rendered, api=_api(cluster), sink=lambda s: None, **FAST)
        message = str(err.value)
        assert "runPolicy.activeDeadlineSeconds=1" in message
        assert "never scheduled (Unschedulable: 0/3 nodes are available" in message
        assert "\n" not in message
        assert cluster.names("PyTorchJob") == []


def test_no_outcome_at_all_gives_up_after_deadline_plus_grace():
    """No operator running: nothing ever happens to the job."""
    rendered = _rendered(active_deadline_s=1)
    with FakeCluster(None) as cluster:
        start = time.monotonic()
        with pytest.raises(LaunchError, match=r"shows no outcome after runPolicy\."
                           r"activeDeadlineSeconds=1: no master pod was ever scheduled"):
            launch_job(rendered, api=_api(cluster), sink=lambda s: None,
                       deadline_grace_s=0.5, **FAST)
        elapsed = time.monotonic() - start
        assert elapsed >= 1.5  # it waited for the deadline (1 s) plus the grace (0.5 s)
        assert elapsed < 30  # a hang guard with room for a loaded machine, not a speed limit
        assert cluster.names("PyTorchJob") == []


def test_failed_configmap_creation_deletes_the_job():
    rendered = _rendered()
    with FakeCluster(None, fail_create={"ConfigMap": 403}) as cluster:
        with pytest.raises(LaunchError) as err:
            launch_job(rendered, api=_api(cluster), **FAST)
        message = str(err.value)
        assert message.startswith(f"creating ConfigMap cnnflow/{rendered.name}-params: "
                                  "forbidden")
        assert message.endswith(f"deleted the PyTorchJob {rendered.name} created before it")
        assert cluster.names("PyTorchJob") == [] and cluster.names("ConfigMap") == []
        assert ("DELETE", f"/apis/kubeflow.org/v1/namespaces/cnnflow/pytorchjobs/"
                f"{rendered.name}") in cluster.requests


def test_cluster_without_training_operator():
    with FakeCluster(None, no_crd=True) as cluster:
        with pytest.raises(LaunchError, match="not served by .*install the Kubeflow training "
                           "operator"):
            launch_job(_rendered(), api=_api(cluster), **FAST)
        assert cluster.objects == {}


def test_missing_kubeconfig_is_one_line_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = tmp_path / "nope" / "config"
    with pytest.raises(LaunchError) as err:
        api_client(str(missing))
    assert str(err.value) == (f"kubeconfig {missing}: not found; set KUBECONFIG or pass the "
                              "file (or run inside the cluster)")
    monkeypatch.setenv("KUBECONFIG", str(missing))
    with pytest.raises(LaunchError, match=f"kubeconfig {missing}: not found"):
        api_client()


def test_kubeconfig_file_is_used(tmp_path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        "clusters: [{name: fake, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: me, user: {token: t}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: me}}]\n")
    assert api_client(str(kubeconfig)).configuration.host == "http://127.0.0.1:1"


def test_launch_training_with_the_kubernetes_backend(tmp_path):
    """The train step's entry: the final config goes into the ConfigMap the job mounts."""
    params = load_params(None, ["launch.backend=kubernetes", "launch.nodes=2",
                                "optim.lr=0.05"])
    lines: list[str] = []
    with FakeCluster(_succeeds) as cluster:
        result = launch_training(params, shards=str(tmp_path / "data" / "shards"),
                                 workspace=tmp_path, run_id="r-7", api=_api(cluster),
                                 echo=lines.append)
        assert result.backend == "kubernetes"
        assert result.out_dir == f"/workspace/runs/{result.name}/train"
        assert "[master-0] epoch 2 loss 1.10" in lines
        (config_map,) = [obj for _, kind, event, obj in cluster.events
                         if kind == "ConfigMap" and event == "ADDED"]
    final = params_from_dict(yaml.safe_load(config_map["data"]["params.yaml"]))
    assert final.optim.lr == 0.05 and final.train.shards == "/workspace/data/shards"
    assert final.train.out_dir == result.out_dir


def test_untagged_image_in_a_hand_written_job_is_refused_before_creation():
    docs = _rendered().documents()
    for spec in docs[1]["spec"]["pytorchReplicaSpecs"].values():
        spec["template"]["spec"]["containers"][0]["image"] = "cnnflow"
    with FakeCluster(None) as cluster:
        with pytest.raises(LaunchError, match="container pytorch image: expected an image "
                           "with a tag or digest.*got 'cnnflow'"):
            launch_job(docs, api=_api(cluster), **FAST)
        assert cluster.requests == []
