"""Rendering and checking TrainJobs (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1):
one launch spec renders both kinds, the TrainJob built with the kubeflow-trainer-api models
reads back through them, and hand-written ones with fields v1alpha1 lacks are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from kubeflow_trainer_api import models as t

from cnnflow.config import load_params
from cnnflow.configs.launch import LaunchConfig
from cnnflow.errors import ConfigError
from cnnflow.launch.pytorchjob import render_job
from cnnflow.launch.trainjob import example_yaml, render_trainjob, validate_trainjob
from cnnflow.launch.validate import ManifestError, validate_documents
from tests.cli import cnnflow

ROOT = Path(__file__).resolve().parents[2]


def _both(**cfg):
    return (render_job(LaunchConfig(**cfg), run_id="run-9", params_yaml="x: 1\n"),
            render_trainjob(LaunchConfig(kind="trainjob", **cfg), run_id="run-9",
                            params_yaml="x: 1\n"))


def _node_pod(job: dict) -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    return rjob["template"]["spec"]["template"]


def test_one_launch_spec_renders_both_kinds_alike():
    cfg = dict(nodes=3, nproc_per_node=2, cpu="1", memory="2Gi", gpus=1, active_deadline_s=600,
               env=["EXTRA=1"], node_selector=["pool=gpu"])
    ptj, tj = _both(**cfg)
    assert ptj.name == tj.name  # the same name per run, unique across runs
    master = ptj.documents()[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    job = tj.documents()[1]
    spec, trainer, pod = job["spec"], job["spec"]["trainer"], _node_pod(job)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    assert spec["activeDeadlineSeconds"] == 600
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 2)
    assert trainer["command"] == ["python", "-m", "cnnflow.train.torchrun", "-m",
                                  "cnnflow.train", "--params", "/etc/cnnflow/params.yaml"]
    assert trainer["image"] == master["containers"][0]["image"]
    assert trainer["resourcesPerNode"] == master["containers"][0]["resources"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "1"
    assert trainer["env"] == master["containers"][0]["env"]  # values and secretKeyRefs
    env = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}
    assert env["EXTRA"] == "1"
    # the pod's hardening, volumes and placement, as the PyTorchJob's pods have them
    for key in ("securityContext", "volumes", "nodeSelector", "tolerations"):
        assert pod["spec"][key] == master[key], key
    if "terminationGracePeriodSeconds" in master:
        assert pod["spec"]["terminationGracePeriodSeconds"] == \
            master["terminationGracePeriodSeconds"]
    (node,) = pod["spec"]["containers"]
    assert node["securityContext"] == master["containers"][0]["securityContext"]
    assert node["volumeMounts"] == master["containers"][0]["volumeMounts"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "train"
    assert job["metadata"]["annotations"] == {"cnnflow/run-id": "run-9"}
    # reads back through the models, and passes the checks a launch makes
    assert t.TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job
    assert validate_documents(tj.documents()) == 2


def test_names_differ_per_run_and_runtime_is_configurable():
    cfg = LaunchConfig(kind="trainjob", runtime="torch-custom")
    a = render_trainjob(cfg, run_id="a").documents()[-1]
    b = render_trainjob(cfg, run_id="b").documents()[-1]
    assert a["metadata"]["name"] != b["metadata"]["name"]
    assert a["spec"]["runtimeRef"]["name"] == "torch-custom"


@pytest.mark.parametrize(("overrides", "message"), [
    (["launch.kind=tfjob"], "launch.kind: expected one of 'pytorchjob', 'trainjob', got 'tfjob'"),
    (["launch.kind=trainjob", "launch.elastic_min_nodes=1", "launch.elastic_max_nodes=2"],
     "launch.elastic_min_nodes: expected 0 with launch.kind=trainjob (Trainer v2 has no "
     "elastic policy), got 1"),
    (["launch.runtime=Torch_Distributed"], "launch.runtime: expected a ClusterTrainingRuntime "
     "name (DNS-1123), got 'Torch_Distributed'"),
])
def test_bad_launch_kind_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_params(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def _hand_written() -> dict:
    return yaml.safe_load("""
apiVersion: trainer.kubeflow.org/v1alpha1
kind: TrainJob
metadata: {name: multi-node-example}
spec:
  runtimeRef: {apiGroup: trainer.kubeflow.org, kind: ClusterTrainingRuntime,
               name: torch-distributed}
  trainer:
    numNodes: 3
    command: [torchrun, train.py]
    resourcesPerNode: {requests: {cpu: "2", memory: 4Gi}}
""")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["spec"].update(elasticPolicy={"minNodes": 1}),
     "TrainJob multi-node-example: spec.elasticPolicy: not a field of "
     "trainer.kubeflow.org/v1alpha1 TrainJob (Trainer v2.3; Trainer v2 has no elastic policy)"),
    (lambda d: d["spec"].update(podTemplateOverrides=[]),
     "spec.podTemplateOverrides: not a field of trainer.kubeflow.org/v1alpha1 TrainJob "
     "(Trainer v2.3; replaced by spec.runtimePatches in Trainer v2.2)"),
    (lambda d: d["spec"]["trainer"]["resourcesPerNode"].update(limitz={}),
     "spec.trainer.resourcesPerNode.limitz: not a field of"),
    (lambda d: d["spec"]["trainer"].update(numProcPerNode="auto"),
     "TrainJob multi-node-example: not a valid TrainJob: spec.trainer.numProcPerNode"),
    (lambda d: d["spec"]["trainer"].update(env=[{"name": "PET_NNODES", "value": "9"}]),
     "spec.trainer.env: must not set PET_NNODES (the torch runtime sets them)"),
    (lambda d: d["metadata"].update(name="Bad_Name"), "metadata.name: expected a DNS-1035"),
    (lambda d: d["spec"].pop("runtimeRef"), "spec.runtimeRef: required (the runtime to run"),
])
def test_hand_written_trainjob_errors_name_the_field(edit, message):
    doc = _hand_written()
    validate_trainjob(copy.deepcopy(doc))  # as Trainer's own example has it: valid
    edit(doc)
    with pytest.raises(ManifestError) as err:
        validate_trainjob(doc)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_render_prints_the_trainjob(tmp_path):
    proc = cnnflow("launch", "render", "--set", "launch.kind=trainjob", "--set",
                   "launch.nodes=2", "--run-id", "r1", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "TrainJob"]
    assert docs[1]["spec"]["trainer"]["numNodes"] == 2
    assert docs[1]["spec"]["runtimeRef"]["name"] == "torch-distributed"
    params = yaml.safe_load(docs[0]["data"]["params.yaml"])
    assert params["launch"]["kind"] == "trainjob"
    assert params["train"]["out_dir"] == f"/workspace/runs/{docs[1]['metadata']['name']}/train"
    assert validate_documents(docs) == 2
    default = cnnflow("launch", "render", "--run-id", "r1", cwd=ROOT)
    assert [d["kind"] for d in yaml.safe_load_all(default.stdout)] == ["ConfigMap",
                                                                       "PyTorchJob"]
    unknown = cnnflow("launch", "render", "--set", "launch.kind=tfjob", cwd=ROOT)
    assert (unknown.returncode, unknown.stdout) == (2, "")
    assert unknown.stderr == ("cnnflow: error: --set launch.kind: expected one of 'pytorchjob', "
                              "'trainjob', got 'tfjob'\n")


def test_example_manifest_is_current():
    path = ROOT / "manifests" / "overlays" / "trainer-v2" / "trainjob.yaml"
    assert path.read_text() == example_yaml(), "run python -m cnnflow.launch.trainjob"
