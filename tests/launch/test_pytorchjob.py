"""Rendering: the PyTorchJob built with the SDK models passes the operator's rules and
the Kubernetes schemas, and carries the run's identity, env, volumes and policies."""

from __future__ import annotations

import copy

import pytest

from cnnflow.configs.launch import LaunchConfig
from cnnflow.errors import ConfigError
from cnnflow.launch.pytorchjob import example_yaml, job_name, render_job
from cnnflow.launch.validate import (
    K8S_SCHEMA_VERSION,
    ManifestError,
    load_documents,
    validate_documents,
    validate_pytorchjob,
)

from .conftest import params_text

CONFIGS = {
    "single": LaunchConfig(),
    "ddp": LaunchConfig(nodes=4, restart_policy="ExitCode"),
    "torchrun": LaunchConfig(nodes=2, nproc_per_node=4, gpus=4, node_selector=["pool=gpu"]),
    "elastic": LaunchConfig(nodes=2, elastic_min_nodes=1, elastic_max_nodes=4),
}


@pytest.mark.parametrize("which", list(CONFIGS))
def test_every_rendered_job_validates(which):
    rendered = render_job(CONFIGS[which], run_id="abc123", params_yaml="train: {}\n",
                          parent_run_id="parent")
    docs = rendered.documents()
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    assert validate_documents(docs) == 2  # schemas + operator rules + security baseline
    job = validate_pytorchjob(docs[1])
    assert type(job).__name__ == "KubeflowOrgV1PyTorchJob"


def test_schema_version_is_the_newest_bundled():
    from kubernetes_validate.utils import latest_version, major_minor

    assert major_minor(latest_version()) == K8S_SCHEMA_VERSION


def test_job_contents():
    cfg = LaunchConfig(nodes=3, tracking_uri="http://mlflow:5000", env=["A=1"])
    r = render_job(cfg, run_id="run-42", params_yaml="x: 1\n", parent_run_id="p-9",
                   identity={"KFP_RUN_ID": "run-42", "CNNFLOW_GIT_COMMIT": "abc"})
    job = r.documents()[1]
    spec = job["spec"]
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert spec["nprocPerNode"] == "1" and "elasticPolicy" not in spec
    assert spec["runPolicy"] == {"activeDeadlineSeconds": 7200, "backoffLimit": 3,
                                 "cleanPodPolicy": "Running", "ttlSecondsAfterFinished": 3600}
    pod = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["name"] == "pytorch" and c["image"] == "cnnflow:0.1.0"
    assert c["command"] == ["python"]
    # one channel: the params ConfigMap; the argv names only the file
    assert c["args"] == ["-m", "cnnflow.train", "--params", "/etc/cnnflow/params.yaml"]
    assert r.documents()[0]["data"] == {"params.yaml": "x: 1\n"}
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    assert env == {"HOME": "/tmp", "KFP_RUN_ID": "run-42", "CNNFLOW_GIT_COMMIT": "abc",
                   "CNNFLOW_PARENT_RUN_ID": "p-9", "A": "1"}
    # credentials only as optional secretKeyRefs (MLflow's login, the object store's keys)
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "value" not in e}
    assert refs == {
        "MLFLOW_TRACKING_USERNAME": {"name": "mlflow-client", "key": "username", "optional": True},
        "MLFLOW_TRACKING_PASSWORD": {"name": "mlflow-client", "key": "password", "optional": True},
        **{k: {"name": "cnnflow-storage", "key": k, "optional": True}
           for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}}
    assert {v["name"] for v in pod["volumes"]} == {"data", "tmp", "dshm", "params"}
    assert pod["securityContext"]["runAsUser"] == 1000
    assert r.out_dir == f"/workspace/runs/{r.name}/train"


def test_the_train_step_resolves_the_final_config_into_the_config_map(tmp_path):
    """plan_job: shards, outputs, checkpoints and the tracking store as the pods see them,
    written once into the ConfigMap; parsed back, it is the config the pods train with."""
    import yaml

    from cnnflow.config import load_params, params_from_dict
    from cnnflow.launch import plan_job

    params = load_params(None, ["optim.lr=0.05", "launch.backend=kubernetes",
                                "launch.tracking_uri=http://mlflow:5000"])
    rendered, final, _ = plan_job(params, shards=str(tmp_path / "data" / "shards"),
                                  workspace=tmp_path, run_id="run-7")
    (text,) = rendered.documents()[0]["data"].values()
    assert params_from_dict(yaml.safe_load(text)) == final
    assert final.train.shards == "/workspace/data/shards"
    assert final.train.out_dir == f"/workspace/runs/{rendered.name}/train"
    assert final.checkpoint.dir == f"/workspace/runs/{rendered.name}/checkpoints"
    assert final.tracking.uri == "http://mlflow:5000" and final.optim.lr == 0.05
    # the local backend's replicas are processes here: the workspace's own paths
    local = load_params(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow/mlflow.db"])
    _, final, mounts = plan_job(local, shards=str(tmp_path / "data" / "shards"),
                                workspace=tmp_path, run_id="run-7")
    assert mounts == {"/workspace": str(tmp_path)}
    assert final.train.shards == str(tmp_path / "data" / "shards")
    assert final.train.out_dir.startswith(f"{tmp_path}/runs/cnnflow-train-")
    assert final.tracking.uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"


def test_torchrun_and_elastic_commands():
    tr = render_job(CONFIGS["torchrun"], run_id="r").documents()[0]
    c = tr["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python"]
    assert c["args"][:4] == ["-m", "cnnflow.train.torchrun", "-m", "cnnflow.train"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    el = render_job(CONFIGS["elastic"], run_id="r").documents()[0]
    assert list(el["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    policy = el["spec"]["elasticPolicy"]
    assert (policy["minReplicas"], policy["maxReplicas"], policy["rdzvBackend"]) == (1, 4, "c10d")
    assert policy["rdzvId"] == el["metadata"]["name"]  # unique per job


def test_grace_period_covers_the_checkpoint_budget():
    # SIGTERM on eviction, SIGKILL after terminationGracePeriodSeconds: the pods' budget
    # (checkpoint.preempt_budget_s, from the params they train with) plus a margin
    text = params_text(["checkpoint.preempt_budget_s=45"])
    job = render_job(CONFIGS["torchrun"], run_id="r", params_yaml=text).documents()[1]
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 45 + 10
    plain = render_job(CONFIGS["torchrun"], run_id="r").documents()[0]
    pod = plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30  # default budget 20 s + 10


def test_job_name_unique_per_run_and_dns_safe():
    a, b = job_name("cnnflow-train", "run-a"), job_name("cnnflow-train", "run-b")
    assert a != b and a == job_name("cnnflow-train", "run-a")
    assert job_name("cnnflow-train") != job_name("cnnflow-train")  # no run id: random
    long = job_name("x" * 39, "r")
    assert len(long) == 48 and len(f"{long}-worker-999999") <= 63


def test_checked_in_example_is_current():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "manifests" / "base" / "pytorchjob.yaml"
    assert path.read_text() == example_yaml(), "run python -m cnnflow.launch.pytorchjob"
    validate_documents(load_documents(path))


@pytest.mark.parametrize("image", ["cnnflow", "registry.local:5000/team/cnnflow", "", "A:1"])
def test_image_without_tag_is_refused(image):
    with pytest.raises(ConfigError, match=f"launch.image: expected an image with a tag or "
                       f"digest.*got {image!r}"):
        LaunchConfig(image=image)


def test_tagged_and_digest_images_are_accepted():
    LaunchConfig(image="registry.local:5000/team/cnnflow:0.1.0")
    LaunchConfig(image="cnnflow@sha256:" + "a" * 64)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"elastic_min_nodes": 3, "elastic_max_nodes": 2, "nodes": 2}, "launch.elastic_min_nodes"),
    ({"elastic_min_nodes": 1, "elastic_max_nodes": 0}, "launch.elastic_min_nodes/"),
    ({"elastic_min_nodes": 1, "elastic_max_nodes": 2, "launcher": "python"}, "launch.launcher"),
    ({"name_prefix": "Train"}, "launch.name_prefix"),
    ({"cpu": "two"}, "launch.cpu"),
    ({"nodes": 0}, "launch.nodes"),
])
def test_bad_launch_config(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LaunchConfig(**kwargs)


def _base_job() -> dict:
    return render_job(LaunchConfig(nodes=2), name="rules").documents()[0]


def _break(path: str, value):
    job = _base_job()
    target = job
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    if value is None:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return job


MASTER = "spec.pytorchReplicaSpecs.Master"
CONTAINER = f"{MASTER}.template.spec.containers.0"


@pytest.mark.parametrize(("path", "value", "message"), [
    (f"{CONTAINER}.name", "trainer", "must have a container named 'pytorch'"),
    (f"{MASTER}.replicas", 2, r"Master.replicas: must be 1, got 2"),
    (f"{MASTER}.restartPolicy", "Sometimes", "restartPolicy: expected one of Always"),
    (f"{CONTAINER}.image", "", r"containers\[0\].image: required"),
    ("metadata.name", "1-bad", "metadata.name: expected a DNS-1035 label"),
    ("spec.runPolicy.cleanPodPolicy", "Some", "cleanPodPolicy: expected one of None"),
    (f"{CONTAINER}.securityContext.runAsUser", "root", "not a valid PyTorchJob"),  # SDK
    (f"{CONTAINER}.imagePulPolicy", "Always",  # the strict core schema: unknown field
     r"PodTemplate rules-master: template.spec.containers.0: .*'imagePulPolicy'"),
])
def test_operator_rules(path, value, message):
    with pytest.raises(ManifestError, match=message):
        validate_pytorchjob(_break(path, value))


def test_nproc_per_node_not_with_elastic_nproc():
    job = render_job(CONFIGS["elastic"], name="el").documents()[0]
    bad = copy.deepcopy(job)
    bad["spec"]["elasticPolicy"]["nProcPerNode"] = 2
    with pytest.raises(ManifestError, match="nProcPerNode: must not be used with spec.nproc"):
        validate_pytorchjob(bad)
    plain = copy.deepcopy(job)
    c = plain["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    c["command"], c["args"] = ["python"], ["-m", "cnnflow.train"]
    with pytest.raises(ManifestError, match="elastic jobs need torchrun"):
        validate_pytorchjob(plain)
    inverted = copy.deepcopy(job)
    inverted["spec"]["elasticPolicy"].update(minReplicas=3, maxReplicas=2)
    with pytest.raises(ManifestError, match="1 <= minReplicas <= maxReplicas, got 3 and 2"):
        validate_pytorchjob(inverted)


def test_security_baseline_is_enforced():
    job = _break(f"{CONTAINER}.securityContext.allowPrivilegeEscalation", None)
    with pytest.raises(ManifestError, match="container pytorch: missing "
                       "allowPrivilegeEscalation: false"):
        validate_documents([job])


# -------------------------------------------------- jobs shaped like the operator's examples


def test_run_policy_is_optional_as_in_the_crd():
    from cnnflow.launch.operator import with_defaults

    job = _base_job()
    del job["spec"]["runPolicy"]
    policy = validate_pytorchjob(job).spec.run_policy  # the SDK model requires one
    assert (policy.clean_pod_policy, policy.backoff_limit, policy.active_deadline_seconds,
            policy.ttl_seconds_after_finished) == (None, None, None, None)
    assert with_defaults(job)["spec"]["runPolicy"] == {"cleanPodPolicy": "None"}


def test_operator_defaults():
    from cnnflow.launch.operator import with_defaults

    job = render_job(CONFIGS["elastic"], name="el").documents()[0]
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    del worker["replicas"], worker["restartPolicy"], job["spec"]["elasticPolicy"]["minReplicas"]
    spec = with_defaults(job)["spec"]
    assert (spec["pytorchReplicaSpecs"]["Worker"]["replicas"],
            spec["pytorchReplicaSpecs"]["Worker"]["restartPolicy"]) == (1, "OnFailure")
    assert (spec["elasticPolicy"]["minReplicas"], spec["elasticPolicy"]["maxReplicas"]) == (4, 4)
    del job["spec"]["elasticPolicy"]["maxReplicas"]
    worker["replicas"] = 3
    spec = with_defaults(job)["spec"]
    assert (spec["elasticPolicy"]["minReplicas"], spec["elasticPolicy"]["maxReplicas"]) == (3, 3)
    assert spec["nprocPerNode"] == "1"  # given by the renderer; "auto" only when absent
    del job["spec"]["nprocPerNode"]
    assert with_defaults(job)["spec"]["nprocPerNode"] == "auto"


def test_elastic_job_without_rdzv_id_is_accepted_with_a_warning(warnings_logged):
    job = render_job(CONFIGS["elastic"], name="el").documents()[0]
    del job["spec"]["elasticPolicy"]["rdzvId"]
    assert validate_pytorchjob(job).spec.elastic_policy.rdzv_id is None
    assert warnings_logged == [
        "PyTorchJob el: spec.elasticPolicy.rdzvId not set: the operator sets no PET_RDZV_ID "
        "and torchrun uses the rendezvous id 'none'; a unique rdzvId is safer (two jobs with "
        "the same rendezvous endpoint would join each other)"]


def test_elastic_metrics_are_read_as_hpa_metrics():
    job = render_job(CONFIGS["elastic"], name="el").documents()[0]
    job["spec"]["elasticPolicy"]["metrics"] = [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]
    (metric,) = validate_pytorchjob(job).spec.elastic_policy.metrics
    assert type(metric).__name__ == "V2MetricSpec"
    assert (metric.type, metric.resource.name, metric.resource.target.average_utilization) == (
        "Resource", "cpu", 80)
    job["spec"]["elasticPolicy"]["metrics"] = [{"resource": {
        "name": "cpu", "target": {"type": "Utilization"}}}]  # no type
    with pytest.raises(ManifestError) as exc:
        validate_pytorchjob(job)
    assert str(exc.value) == ("PyTorchJob el: spec.elasticPolicy.metrics.0: 'type' is a "
                              "required property")


def test_elastic_job_needs_a_worker():
    job = render_job(CONFIGS["elastic"], name="el").documents()[0]
    specs = job["spec"]["pytorchReplicaSpecs"]
    specs["Master"] = specs.pop("Worker")
    specs["Master"]["replicas"] = 1
    with pytest.raises(ManifestError) as exc:
        validate_pytorchjob(job)
    assert str(exc.value) == ("PyTorchJob el: spec.pytorchReplicaSpecs.Worker: required with "
                              "spec.elasticPolicy")


def test_master_replicas_must_be_given():
    """The operator's defaulter would set 1, but its admission webhook (v1.9.0,
    pytorchjob_webhook.go) sees the job first and refuses `replicas: nil` for the Master;
    Worker replicas may be left out (default 1, see test_local)."""
    job = _break(f"{MASTER}.replicas", None)
    with pytest.raises(ManifestError) as exc:
        validate_pytorchjob(job)
    assert str(exc.value) == (
        "PyTorchJob rules: spec.pytorchReplicaSpecs.Master.replicas: required, must be 1 "
        "(the operator's webhook refuses a Master without it): add replicas: 1")
    validate_pytorchjob(_break("spec.pytorchReplicaSpecs.Worker.replicas", None))


def test_worker_replicas_below_one_are_refused_as_the_webhook_does():
    """pytorchjob_webhook.go (v1.9.0): a Worker's replicas, when given, "must be at least
    1"; a job with no workers leaves the Worker out."""
    for count in (0, -1):
        with pytest.raises(ManifestError) as exc:
            validate_pytorchjob(_break("spec.pytorchReplicaSpecs.Worker.replicas", count))
        assert str(exc.value) == (
            "PyTorchJob rules: spec.pytorchReplicaSpecs.Worker.replicas: must be at least 1 "
            f"(the operator's webhook refuses fewer), got {count}")
