"""One image: `cnnflow pipeline compile --image REF` sets every step's image and the
training job's (launch.image), and the steps' pods carry the security context.

The job is rendered as the train step renders it (`cnnflow.launch.plan_job` with the
params the compiled pipeline hands the train step by default), for both kinds: the
PyTorchJob and the TrainJob (launch.kind=trainjob).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cnnflow.config import load_params
from cnnflow.kfp.params import SEP, kfp_name
from tests.cli import cnnflow

IMAGE = "registry.example/team/cnnflow:1.2"
STEPS = ("prepare", "shard", "train", "evaluate", "finish")


def _compiled(path: Path) -> tuple[dict, dict]:
    pipeline, platform = yaml.safe_load_all(path.read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _train_image(pipeline: dict) -> str:
    """launch.image as the train step receives it when the run passes no arguments: the
    record in its `params` input, with the pipeline parameter at its compiled default."""
    task = pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]["train"]
    text = task["inputs"]["parameters"]["params"]["runtimeValue"]["constant"]
    (record,) = [r for r in text.split(SEP) if r.startswith("launch.image=")]
    name = kfp_name("launch.image")
    assert record == f"launch.image={{{{$.inputs.parameters['pipelinechannel--{name}']}}}}"
    return pipeline["root"]["inputDefinitions"]["parameters"][name]["defaultValue"]


def test_compile_with_image_sets_every_step_and_the_training_job(tmp_path):
    out = tmp_path / "p.yaml"
    done = cnnflow("pipeline", "compile", "--image", IMAGE, "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"compiled the pipeline -> {out}"
    pipeline, executors = _compiled(out)
    images = {name: e["container"]["image"]
              for name, e in pipeline["deploymentSpec"]["executors"].items()}
    assert images == {f"exec-{s}": IMAGE for s in STEPS}
    from cnnflow.launch import plan_job

    image = _train_image(pipeline)
    assert image == IMAGE
    jobs = {}
    for kind in ("pytorchjob", "trainjob"):
        params = load_params(None, [f"launch.image={image}", "launch.backend=kubernetes",
                                    f"launch.kind={kind}"])
        rendered, _, _ = plan_job(params, shards="/workspace/data/shards",
                                  workspace="/workspace", run_id="run-1", pod_view=True)
        jobs[kind] = rendered.documents()[-1]
    job = jobs["pytorchjob"]
    assert job["kind"] == "PyTorchJob"
    for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items():
        (container,) = spec["template"]["spec"]["containers"]
        assert container["image"] == IMAGE, rtype
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["CNNFLOW_IMAGE"] == IMAGE, rtype  # -> the train run's cnnflow.image tag
    trainer = jobs["trainjob"]["spec"]["trainer"]
    assert jobs["trainjob"]["kind"] == "TrainJob" and trainer["image"] == IMAGE
    assert {e["name"]: e.get("value") for e in trainer["env"]}["CNNFLOW_IMAGE"] == IMAGE


def test_steps_run_as_the_image_user_with_requests_and_limits(tmp_path):
    out = tmp_path / "p.yaml"
    done = cnnflow("pipeline", "compile", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    pipeline, executors = _compiled(out)
    for step in STEPS:
        container = pipeline["deploymentSpec"]["executors"][f"exec-{step}"]["container"]
        assert container["image"] == "cnnflow:0.1.0"
        resources = container["resources"]
        for key in ("cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit"):
            assert resources[key] > 0, (step, key)
        assert resources["cpuRequest"] <= resources["cpuLimit"], step
        assert resources["memoryRequest"] <= resources["memoryLimit"], step
        assert executors[f"exec-{step}"]["securityContext"] == {
            "runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}, step


def test_an_image_without_tag_is_refused_in_one_line(tmp_path):
    for command in (["compile", "--out", str(tmp_path / "p.yaml")],
                    ["submit", "--host", "http://127.0.0.1:9"]):
        done = cnnflow("pipeline", *command, "--image", "registry.example/team/cnnflow",
                       cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("cnnflow: error: --image: expected an image with a tag or "
                               "digest"), line
        assert "'registry.example/team/cnnflow'" in line
    assert not (tmp_path / "p.yaml").exists()
