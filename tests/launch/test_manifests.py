"""manifests/: every overlay renders with `kubectl kustomize` and every object validates
(core kinds against the Kubernetes schemas, the PyTorchJob against the operator's rules),
with the security baseline on every container."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass, field
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
                ("Service", "mlflow"), ("NetworkPolicy", "default-deny"),
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


# ---------------------------------------------------------------- network policies
#
# A small evaluator of networking.k8s.io/v1 NetworkPolicy semantics (podSelector,
# namespaceSelector, ipBlock with except, ports with protocol and endPort; policies add
# up, a pod selected by no policy of a direction allows everything in it): a flow is
# allowed when the source's egress and the destination's ingress both allow it.


@dataclass(frozen=True)
class Pod:
    """A pod, or with namespace "" an address outside the cluster (no policy selects it)."""

    name: str
    labels: dict = field(default_factory=dict, hash=False)
    namespace: str = "cnnflow"
    ip: str = ""


def _selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, other: Pod) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        if not other.ip:
            return False
        addr = ipaddress.ip_address(other.ip)
        return addr in ipaddress.ip_network(block["cidr"]) and not any(
            addr in ipaddress.ip_network(x) for x in block.get("except") or [])
    if not other.namespace:  # an address outside the cluster: ipBlock only
        return False
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_sel is None:
        in_ns = other.namespace == policy_ns
    else:
        in_ns = _selects(ns_sel, {"kubernetes.io/metadata.name": other.namespace})
    return in_ns and (pod_sel is None or _selects(pod_sel, other.labels))


def _port_matches(ports: list | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and (
        "port" not in p or p["port"] <= port <= p.get("endPort", p["port"])) for p in ports)


def _direction_allows(policies: list[dict], pod: Pod, other: Pod, port: int, protocol: str,
                      kind: str) -> bool:
    mine = [p for p in policies if p["metadata"].get("namespace") == pod.namespace
            and _selects(p["spec"]["podSelector"], pod.labels)
            and kind in p["spec"].get("policyTypes", ["Ingress"])]
    if not mine:
        return True  # not isolated in this direction
    key, peers = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    return any(
        (not rule.get(peers) or any(_peer_matches(x, pod.namespace, other) for x in rule[peers]))
        and _port_matches(rule.get("ports"), port, protocol)
        for p in mine for rule in p["spec"].get(key) or [])


def allowed(policies: list[dict], src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    return (_direction_allows(policies, src, dst, port, protocol, "Egress")
            and _direction_allows(policies, dst, src, port, protocol, "Ingress"))


def _pods(docs: list[dict]) -> dict[str, Pod]:
    """The pods the manifests make, labelled as their controllers label them."""
    kinds = by_kind(docs)
    mlflow = kinds[("Deployment", "mlflow")]["spec"]["template"]["metadata"]["labels"]
    job = kinds[("PyTorchJob", "cnnflow-train-example")]
    specs = job["spec"]["pytorchReplicaSpecs"]

    def replica(rtype: str) -> dict:  # the training operator's labels, plus the template's
        return {**(specs[rtype]["template"].get("metadata") or {}).get("labels", {}),
                "training.kubeflow.org/job-name": job["metadata"]["name"],
                "training.kubeflow.org/replica-type": rtype.lower(),
                "training.kubeflow.org/replica-index": "0"}

    return {
        "master": Pod("master", replica("Master")), "worker": Pod("worker", replica("Worker")),
        "mlflow": Pod("mlflow", mlflow),
        "step": Pod("step", {"pipelines.kubeflow.org/v2_component": "true"}),
        "postgres": Pod("postgres", {"app.kubernetes.io/name": "postgres"}),
        "unlabelled": Pod("unlabelled", {"app": "debug"}),
        "kube-dns": Pod("kube-dns", {"k8s-app": "kube-dns"}, "kube-system"),
        "other-ns": Pod("other-ns", {"pipelines.kubeflow.org/v2_component": "true"}, "team-b"),
        "ml-pipeline": Pod("ml-pipeline", {"app": "ml-pipeline"}, "kubeflow"),
        "kfp-minio": Pod("kfp-minio", {"app": "minio"}, "kubeflow"),
        "s3": Pod("s3", {}, "", ip="198.51.100.10"),  # inside the placeholders
        "apiserver": Pod("apiserver", {}, "", ip="192.0.2.1"),
        "internet": Pod("internet", {}, "", ip="203.0.113.7"),
    }


# (source, destination, port, protocol): what cnnflow's pods need
NEEDED = [
    ("master", "mlflow", 5000, "TCP"), ("worker", "mlflow", 5000, "TCP"),
    ("step", "mlflow", 5000, "TCP"),
    ("step", "kube-dns", 53, "UDP"), ("step", "kube-dns", 53, "TCP"),
    ("worker", "kube-dns", 53, "UDP"), ("mlflow", "kube-dns", 53, "UDP"),
    ("mlflow", "postgres", 5432, "TCP"),
    ("worker", "master", 23456, "TCP"), ("worker", "master", 29400, "TCP"),
    ("master", "worker", 41234, "TCP"),  # gloo's ephemeral ports, both ways
    ("step", "apiserver", 6443, "TCP"), ("step", "apiserver", 443, "TCP"),
    ("step", "ml-pipeline", 8887, "TCP"), ("step", "kfp-minio", 9000, "TCP"),
    ("master", "s3", 443, "TCP"), ("step", "s3", 443, "TCP"), ("mlflow", "s3", 443, "TCP"),
    ("worker", "kfp-minio", 9000, "TCP"), ("mlflow", "kfp-minio", 9000, "TCP"),
]
# and what must stay closed
DENIED = [
    ("master", "postgres", 5432, "TCP"), ("step", "postgres", 5432, "TCP"),
    ("master", "mlflow", 5001, "TCP"), ("mlflow", "master", 23456, "TCP"),
    ("step", "master", 23456, "TCP"), ("master", "apiserver", 6443, "TCP"),
    ("mlflow", "apiserver", 443, "TCP"), ("other-ns", "mlflow", 5000, "TCP"),
    ("master", "internet", 443, "TCP"), ("step", "internet", 443, "TCP"),
    ("master", "ml-pipeline", 8887, "TCP"), ("postgres", "s3", 443, "TCP"),
    ("unlabelled", "mlflow", 5000, "TCP"), ("unlabelled", "s3", 443, "TCP"),
    ("mlflow", "unlabelled", 8080, "TCP"), ("master", "unlabelled", 8080, "TCP"),
    ("other-ns", "unlabelled", 8080, "TCP"), ("other-ns", "master", 23456, "TCP"),
    ("step", "kube-dns", 5353, "UDP"),
]


def _policies(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "NetworkPolicy"]


@needs_kubectl
@pytest.mark.parametrize("target", ["base", "overlays/local", "overlays/gpu"])
def test_network_policies_allow_exactly_the_needed_flows(target):
    docs = render(target)
    policies, pods = _policies(docs), _pods(docs)
    if target == "overlays/local":  # the API server of a kind cluster, on a private range
        pods["apiserver"] = Pod("apiserver", {}, "", ip="172.18.0.2")
        assert allowed(policies, pods["step"], pods["apiserver"], 8443)
    for src, dst, port, proto in NEEDED:
        assert allowed(policies, pods[src], pods[dst], port, proto), (src, dst, port, proto)
    for src, dst, port, proto in DENIED:
        assert not allowed(policies, pods[src], pods[dst], port, proto), (src, dst, port, proto)


@needs_kubectl
def test_default_deny_covers_every_pod_both_ways():
    policies = _policies(render("base"))
    deny = next(p for p in policies if p["metadata"]["name"] == "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    pods = _pods(render("base"))
    # a pod no allowing policy names gets DNS and nothing else
    assert allowed(policies, pods["unlabelled"], pods["kube-dns"], 53, "UDP")
    assert not allowed(policies, pods["unlabelled"], pods["kube-dns"], 80, "TCP")
    assert not allowed(policies, pods["unlabelled"], pods["internet"], 443, "TCP")
    # without the allowing policies, nothing at all passes, not even DNS
    for src, dst, port, proto in NEEDED:
        if pods[src].namespace == "cnnflow":
            assert not allowed([deny], pods[src], pods[dst], port, proto), (src, dst)


def test_evaluator_follows_the_api_semantics():
    """The evaluator's own rules, on policies written for the purpose."""
    a, b = Pod("a", {"role": "a"}), Pod("b", {"role": "b"})
    assert allowed([], a, b, 80)  # no policy: not isolated
    ingress_b = {"metadata": {"name": "x", "namespace": "cnnflow"}, "spec": {
        "podSelector": {"matchLabels": {"role": "b"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "a"}}}],
                     "ports": [{"port": 80, "endPort": 90}]}]}}  # policyTypes default Ingress
    assert allowed([ingress_b], a, b, 85) and not allowed([ingress_b], a, b, 91)
    assert not allowed([ingress_b], a, b, 85, "UDP") and not allowed([ingress_b], b, b, 80)
    assert allowed([ingress_b], b, a, 1)  # a is not selected: not isolated
    block = {"metadata": {"name": "y", "namespace": "cnnflow"}, "spec": {
        "podSelector": {}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]}}
    assert allowed([block], a, Pod("x", namespace="", ip="10.2.0.1"), 443)
    assert not allowed([block], a, Pod("x", namespace="", ip="10.1.0.1"), 443)
    assert not allowed([block], a, b, 443)  # an ipBlock peer never matches a pod here


@needs_kubectl
def test_readme_patch_names_the_api_server_and_the_object_store(tmp_path):
    """The overlay in manifests/README.md, built as a user would (kubectl kustomize)."""
    text = (ROOT / "manifests" / "README.md").read_text()
    block = text.split("<!-- netpol-patch -->\n```yaml\n", 1)[1].split("```", 1)[0]
    overlay = tmp_path / "overlays" / "mine"
    overlay.mkdir(parents=True)
    (tmp_path / "base").symlink_to(ROOT / "manifests" / "base")
    (overlay / "kustomization.yaml").write_text(block)
    out = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True,
                         timeout=60, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    policies, pods = _policies(docs), _pods(docs)
    api, store = Pod("api", {}, "", ip="10.0.0.1"), Pod("store", {}, "", ip="10.20.3.4")
    assert allowed(policies, pods["step"], api, 6443)
    assert not allowed(policies, pods["master"], api, 6443)
    for who in ("master", "step", "mlflow"):
        assert allowed(policies, pods[who], store, 443), who
        assert not allowed(policies, pods[who], pods["s3"], 443), who  # placeholder gone
    assert not allowed(policies, pods["postgres"], store, 443)
