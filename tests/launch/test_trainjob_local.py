"""The local backend for TrainJobs: each node a process group here, with the env the
Trainer's torch plugin gives it, under real torchrun (gloo); restarts and failures as
JobSet handles them. Hand-written TrainJobs are shaped like Trainer v2.3's examples."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from cnnflow.config import load_params
from cnnflow.launch import launch_training
from cnnflow.launch.trainjob_local import LocalTrainJob
from tests.cli import cnnflow

TINY = ["train.epochs=1", "train.max_steps=4", "train.batch_size=32", "model.width=8",
        "train.log_every=1"]

SCRIPT = """
import os, torch.distributed as dist
dist.init_process_group("gloo")
pet = {k: os.environ[k] for k in sorted(os.environ) if k.startswith("PET_")}
print("SAW", dist.get_rank(), dist.get_world_size(), repr(pet), flush=True)
dist.destroy_process_group()
"""


def _trainjob(name: str, trainer: dict, **spec) -> dict:
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name},
            "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org",
                                    "kind": "ClusterTrainingRuntime",
                                    "name": "torch-distributed"},
                     "trainer": trainer, **spec}}


@pytest.mark.distributed
@pytest.mark.slow
def test_hand_written_trainjob_two_nodes_under_torchrun(tmp_path, monkeypatch):
    """`cnnflow launch FILE --local` with a TrainJob as Trainer's examples write them."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    job = _trainjob("multi-node-example", {
        "numNodes": 2, "command": ["torchrun", "--no-python", "python3", "-c", SCRIPT],
        "resourcesPerNode": {"requests": {"cpu": "1", "memory": "1Gi"}}})
    path = tmp_path / "trainjob.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = cnnflow("launch", str(path), "--local", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saw = {}
    for line in proc.stderr.splitlines():
        if " SAW " in f" {line}":
            label, _, rank, world, pet = line.split(" ", 4)
            saw[label] = (int(rank), int(world), ast.literal_eval(pet))
    master = saw["[node-0]"][2]["PET_MASTER_PORT"]
    assert saw == {
        f"[node-{i}]": (i, 2, {"PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": master,
                               "PET_NNODES": "2", "PET_NODE_RANK": str(i),
                               "PET_NPROC_PER_NODE": "1"})  # auto: 1 CPU requested
        for i in range(2)}


@pytest.mark.distributed
@pytest.mark.slow
def test_cnnflow_train_as_a_two_node_trainjob(tmp_path, digits_shards):
    """launch_training (the train step's entry) with launch.kind=trainjob, backend local."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "shards").symlink_to(digits_shards)
    params = load_params(None, ["tracking.enabled=false", *TINY, "launch.kind=trainjob",
                                "launch.nodes=2", "launch.nproc_per_node=1",
                                f"launch.local_mounts=[/workspace={ws}]"])
    lines: list[str] = []
    result = launch_training(params, shards=str(ws / "data" / "shards"), workspace=ws,
                             run_id="tj-run", echo=lines.append)
    assert result.backend == "local" and result.out_dir == f"{ws}/runs/{result.name}/train"
    assert (Path(result.out_dir) / "model.pt").is_file()
    assert any(line.startswith("[node-1] ") and "rank 1/2 joined gloo" in line
               for line in lines), "\n".join(lines[-20:])
    steps = [json.loads(x) for x in (Path(result.out_dir) / "steps.jsonl").read_text()
             .splitlines() if x]
    assert len(steps) == 4


def test_a_failing_node_restarts_under_onfailure(tmp_path):
    """torch-distributed's pods restart OnFailure (JobSet's default): node 1 fails once."""
    marker = tmp_path / "failed-once"
    fail_once = (f"import os,sys,pathlib; p=pathlib.Path({str(marker)!r});"
                 "r=os.environ['PET_NODE_RANK'];"
                 "sys.exit(0) if r=='0' or p.exists() else (p.touch(), sys.exit(3))")
    job = _trainjob("restart", {"numNodes": 2, "command": ["python", "-c", fail_once]})
    result = LocalTrainJob(job, echo=lambda s: None).run()
    assert (result.succeeded, result.restarts) == (True, 1)


def test_runtime_in_the_file_decides_restarts_and_backoff(tmp_path):
    """A ClusterTrainingRuntime in the YAML file replaces the built-in description: here
    restartPolicy Never, so node 1's exit fails the job and node 0 is stopped."""
    waits = f"import pathlib,time\nwhile not pathlib.Path({str(tmp_path / 'never')!r}).exists():" \
            "\n    time.sleep(0.05)"
    runtime = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
               "metadata": {"name": "strict"}, "spec": {"mlPolicy": {"torch": {}}, "template": {
                   "spec": {"replicatedJobs": [{"name": "node", "template": {
                       "metadata": {"labels": {
                           "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                       "spec": {"backoffLimit": 0, "template": {"spec": {
                           "restartPolicy": "Never",
                           "containers": [{"name": "node", "image": "python:3.11"}]}}}}}]}}}}
    cmd = ("import os,sys\nif os.environ['PET_NODE_RANK']=='1': sys.exit(3)\n" + waits)
    job = _trainjob("strict-job", {"numNodes": 2, "command": ["python", "-c", cmd]})
    job["spec"]["runtimeRef"]["name"] = "strict"
    result = LocalTrainJob([runtime, job], echo=lambda s: None, kill_grace_s=2).run()
    assert not result.succeeded and result.exit_code == 3
    assert result.reason == "replica node-1 exited with code 3 (restartPolicy Never)"


def test_active_deadline_stops_the_nodes():
    job = _trainjob("slow", {"command": ["python", "-c", "import time; time.sleep(600)"]},
                    activeDeadlineSeconds=1)
    result = LocalTrainJob(job, echo=lambda s: None, kill_grace_s=2).run()
    assert not result.succeeded and "activeDeadlineSeconds=1" in result.reason


@pytest.mark.parametrize(("edit", "message"), [
    (lambda j: j["spec"].update(elasticPolicy={"maxNodes": 3}),
     "TrainJob bad: spec.elasticPolicy: not a field of trainer.kubeflow.org/v1alpha1 TrainJob "
     "(Trainer v2.3; Trainer v2 has no elastic policy)"),
    (lambda j: j["spec"]["runtimeRef"].update(name="deepspeed"),
     "TrainJob bad: spec.runtimeRef.name: ClusterTrainingRuntime 'deepspeed' is neither in "
     "the job file nor built in (torch-distributed): add its ClusterTrainingRuntime document "
     "to the file"),
    (lambda j: j["spec"]["trainer"].pop("command"),
     "TrainJob bad: spec.trainer.command: required to run locally (the ENTRYPOINT of image "
     "'pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime' is unknown here)"),
])
def test_bad_trainjob_files_are_one_line(tmp_path, edit, message):
    job = _trainjob("bad", {"numNodes": 1, "command": ["python", "-c", "pass"]})
    edit(job)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = cnnflow("launch", str(path), "--local", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"cnnflow: error: {message}"]
