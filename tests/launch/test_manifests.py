"""manifests/: every overlay renders with `kubectl kustomize` and every object validates
(core kinds against the Kubernetes schemas, the PyTorchJob against the operator's rules),
with the security baseline on every container."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cnnflow.launch.validate import pod_specs, validate_documents

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl")

def needs_kubectl(test):
    """kubectl renders the kustomizations; without it these tests fail (never skip)."""
    return test


def render(target: str) -> list[dict]:
    if KUBECTL is None:
        pytest.fail("kubectl not found: cannot render the kustomizations "
                    "(Debian: apt-get install kubectl)")
    out = subprocess.run([KUBECTL, "kustomize", str(ROOT / "manifests" / target)],
                         capture_output=True, text=True, timeout=60, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@needs_kubectl
@pytest.mark.parametrize("target", ["base", "overlays/local", "overlays/gpu",
                                    "overlays/postgres"])
def test_overlay_renders_and_validates(target):
    docs = render(target)
    assert validate_documents(docs) == len(docs)
    kinds = by_kind(docs)
    for key in [("Namespace", "cnnflow"), ("ServiceAccount", "cnnflow-launcher"),
                ("Role", "cnnflow-launcher"), ("RoleBinding", "cnnflow-launcher"),
                ("PersistentVolumeClaim", "cnnflow-data"), ("Deployment", "mlflow"),
                ("Service", "mlflow"), ("NetworkPolicy", "mlflow-from-namespace"),
                ("NetworkPolicy", "training-peers"), ("PyTorchJob", "cnnflow-train-example")]:
        assert key in kinds, key
    assert all(d["metadata"].get("namespace") == "cnnflow" for d in docs
               if d["kind"] != "Namespace")
    for where, spec in [w for d in docs for w in pod_specs(d)]:
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), where


@needs_kubectl
def test_role_allows_exactly_what_the_launcher_calls():
    role = by_kind(render("base"))[("Role", "cnnflow-launcher")]
    rules = {(r["apiGroups"][0], res): sorted(r["verbs"]) for r in role["rules"]
             for res in r["resources"]}
    assert rules == {
        ("kubeflow.org", "pytorchjobs"): ["create", "delete", "get", "list", "watch"],
        ("", "configmaps"): ["create", "delete"],
        ("", "pods"): ["get", "list"],
        ("", "pods/log"): ["get"],
    }


@needs_kubectl
def test_mlflow_server_flags():
    deploy = by_kind(render("base"))[("Deployment", "mlflow")]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--host=0.0.0.0" in args  # the rest: test_manifests_storage.py
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    for name in ("mlflow", "mlflow.cnnflow", "mlflow.cnnflow.svc",
                 "mlflow.cnnflow.svc.cluster.local"):
        assert name in hosts.split(",") and f"{name}:5000" in hosts.split(",")


@needs_kubectl
def test_overlays_differ_where_they_should():
    base, local, gpu = (by_kind(render(t)) for t in ("base", "overlays/local", "overlays/gpu"))
    key = ("PyTorchJob", "cnnflow-train-example")

    def master(docs):
        return docs[key]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]

    assert master(gpu)["containers"][0]["image"] == "cnnflow:0.1.0-cuda"
    assert master(gpu)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert master(gpu)["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0][
        "image"] == "cnnflow:0.1.0-cuda"
    assert master(base)["containers"][0]["image"] == "cnnflow:0.1.0"
    pvc = ("PersistentVolumeClaim", "cnnflow-data")
    assert base[pvc]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert local[pvc]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert master(local)["containers"][0]["imagePullPolicy"] == "Never"


def test_dockerfile_variants_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and 'ARG TORCH_INDEX_URL=""' in text
    assert "torch==2.13.0" in text and "USER 1000:1000" in text
    assert "download.pytorch.org" not in text  # index given by build arg, not hardcoded
    assert (ROOT / ".dockerignore").read_text().startswith("# Only")
