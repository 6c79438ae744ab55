"""Check manifests before they reach a cluster.

- Core kinds (Deployment, Service, Role, ...) against the Kubernetes JSON schemas that
  `kubernetes-validate` bundles (strict: unknown fields are errors), version
  `K8S_SCHEMA_VERSION` = the newest one the installed package ships (offline).
- PyTorchJob: deserialized with the kubeflow-training SDK into `KubeflowOrgV1PyTorchJob`,
  then the training operator's admission rules (pytorchjob_webhook.go, v1.9): name a
  DNS-1035 label, replica types Master/Worker only, containers with an image and one
  named `pytorch`, Master replicas = 1 (given: the webhook sees the job before the
  defaulter would set 1), Worker replicas >= 1 when given, a Worker for elastic jobs,
  `spec.nprocPerNode` not combined with `elasticPolicy.nProcPerNode`; plus the CRD's
  enums (restartPolicy, cleanPodPolicy) and our own rules for elastic jobs (torchrun,
  1 <= min <= max; a warning without an rdzvId). Each replica's pod template is also
  checked against the core PodTemplate schema, elasticPolicy.metrics against the
  HorizontalPodAutoscaler's.
  The SDK model is stricter than the CRD: it requires `spec.runPolicy` (optional: an empty
  one stands in) and cannot read `elasticPolicy.metrics` (its K8sIoApiAutoscalingV2MetricSpec
  is missing: they are read as the kubernetes client's V2MetricSpec instead).
- TrainJob: `cnnflow.launch.trainjob.validate_trainjob` (v1alpha1 fields and types).
- `check_pod_security`: the hardening every cnnflow container must have.

Every failure is a `ManifestError` (a `CnnflowError`): one line naming the object and field.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from cnnflow.errors import CnnflowError

K8S_SCHEMA_VERSION = "1.37"
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("None", "Running", "All")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

log = logging.getLogger("cnnflow")


class ManifestError(CnnflowError):
    """A manifest breaks a Kubernetes schema, an operator rule or our security baseline."""


def _where(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')} {meta.get('name', '?')}"


def _schema_problem(doc: dict[str, Any], version: str = K8S_SCHEMA_VERSION) -> str | None:
    """"path: message" where a core kind breaks its bundled schema (strict), else None."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(root)"
        return f"{path}: {exc.message.splitlines()[0]}"
    except SchemaNotFoundError as exc:
        return exc.message
    return None


def validate_core(doc: dict[str, Any], version: str = K8S_SCHEMA_VERSION) -> None:
    """Validate a core kind against the bundled Kubernetes schema (strict)."""
    problem = _schema_problem(doc, version)
    if problem is not None:
        raise ManifestError(f"{_where(doc)}: {problem}")


class _Response:
    """What the SDK's ApiClient.deserialize reads: an object with `.data` (JSON text)."""

    def __init__(self, doc: Any) -> None:
        self.data = json.dumps(doc)


def _metrics(doc: dict[str, Any], metrics: Any) -> list:
    """elasticPolicy.metrics, checked as an HPA's and read as kubernetes' V2MetricSpec."""
    from kubernetes.client import ApiClient as CoreClient

    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": "elastic"}, "spec": {"maxReplicas": 1, "metrics": metrics,
           "scaleTargetRef": {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                              "name": "elastic"}}}
    problem = _schema_problem(hpa)
    if problem is not None:
        raise ManifestError(f"{_where(doc)}: spec.elasticPolicy.{problem.removeprefix('spec.')}")
    return CoreClient().deserialize(_Response(metrics), "list[V2MetricSpec]")


def to_model(doc: dict[str, Any]):
    """A PyTorchJob dict as the SDK's `KubeflowOrgV1PyTorchJob` (schema types checked)."""
    from kubeflow.training.api_client import ApiClient

    spec, metrics = doc.get("spec"), None
    if isinstance(spec, dict):  # where the SDK is stricter than the CRD (module docstring)
        spec = {**spec, "runPolicy": spec.get("runPolicy") or {}}
        elastic = spec.get("elasticPolicy")
        if isinstance(elastic, dict) and elastic.get("metrics") is not None:
            spec["elasticPolicy"] = {k: v for k, v in elastic.items() if k != "metrics"}
            metrics = _metrics(doc, elastic["metrics"])
        doc = {**doc, "spec": spec}
    try:
        job = ApiClient().deserialize(_Response(doc), "KubeflowOrgV1PyTorchJob")
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{_where(doc)}: not a valid PyTorchJob: {exc}") from None
    if metrics is not None:
        job.spec.elastic_policy.metrics = metrics
    return job


def _is_torchrun(container: Any) -> bool:
    argv = [*(container.command or []), *(container.args or [])]
    return any(a == "torchrun" or a.endswith("/torchrun") or a == "torch.distributed.run"
               or a == "cnnflow.train.torchrun" for a in argv)


def validate_pytorchjob(doc: dict[str, Any]):
    """Operator rules + SDK model + pod template schemas; returns the SDK model."""
    where = _where(doc)
    if doc.get("apiVersion") != "kubeflow.org/v1" or doc.get("kind") != "PyTorchJob":
        raise ManifestError(f"{where}: expected apiVersion kubeflow.org/v1, kind PyTorchJob")
    job = to_model(doc)
    name = job.metadata.name if job.metadata else None
    if not name or len(name) > 63 or not _DNS1035.match(name):
        raise ManifestError(f"{where}: metadata.name: expected a DNS-1035 label "
                            f"(a-z first, a-z0-9-, <= 63 chars), got {name!r}")
    spec = job.spec
    if spec is None or not spec.pytorch_replica_specs:
        raise ManifestError(f"{where}: spec.pytorchReplicaSpecs: required")
    elastic = spec.elastic_policy
    if elastic is not None and elastic.n_proc_per_node is not None and spec.nproc_per_node:
        raise ManifestError(f"{where}: spec.elasticPolicy.nProcPerNode: must not be used "
                            "with spec.nprocPerNode")
    if spec.nproc_per_node is not None and not (
        spec.nproc_per_node in ("auto", "cpu", "gpu") or spec.nproc_per_node.isdigit()
    ):
        raise ManifestError(f"{where}: spec.nprocPerNode: expected an int, auto, cpu or gpu, "
                            f"got {spec.nproc_per_node!r}")
    run_policy = spec.run_policy
    if run_policy and run_policy.clean_pod_policy not in (None, *CLEAN_POD_POLICIES):
        raise ManifestError(f"{where}: spec.runPolicy.cleanPodPolicy: expected one of "
                            f"{', '.join(CLEAN_POD_POLICIES)}, got {run_policy.clean_pod_policy!r}")
    torchrun = True
    for rtype, rspec in spec.pytorch_replica_specs.items():
        path = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            raise ManifestError(f"{where}: {path}: expected replica type Master or Worker")
        containers = (rspec.template.spec.containers
                      if rspec and rspec.template and rspec.template.spec else None)
        if not containers:
            raise ManifestError(f"{where}: {path}.template.spec.containers: required")
        for i, c in enumerate(containers):
            if not c.image:
                raise ManifestError(f"{where}: {path}.template.spec.containers[{i}].image: "
                                    "required")
        main = [c for c in containers if c.name == "pytorch"]
        if not main:
            raise ManifestError(f"{where}: {path}.template.spec.containers: must have a "
                                "container named 'pytorch'")
        torchrun = torchrun and _is_torchrun(main[0])
        if rtype == "Master" and rspec.replicas is None:
            raise ManifestError(f"{where}: {path}.replicas: required, must be 1 (the operator's "
                                "webhook refuses a Master without it): add replicas: 1")
        if rtype == "Master" and rspec.replicas != 1:
            raise ManifestError(f"{where}: {path}.replicas: must be 1, got {rspec.replicas!r}")
        if rspec.replicas is not None and rspec.replicas < 1:
            raise ManifestError(f"{where}: {path}.replicas: must be at least 1 (the operator's "
                                f"webhook refuses fewer), got {rspec.replicas}")
        if rspec.restart_policy not in (None, *RESTART_POLICIES):
            raise ManifestError(f"{where}: {path}.restartPolicy: expected one of "
                                f"{', '.join(RESTART_POLICIES)}, got {rspec.restart_policy!r}")
        template = doc["spec"]["pytorchReplicaSpecs"][rtype]["template"]
        validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": f"{name}-{rtype.lower()}"}, "template": template})
    if elastic is not None:
        if "Worker" not in spec.pytorch_replica_specs:
            raise ManifestError(f"{where}: spec.pytorchReplicaSpecs.Worker: required with "
                                "spec.elasticPolicy")
        lo, hi = elastic.min_replicas, elastic.max_replicas
        if lo is not None and hi is not None and not 1 <= lo <= hi:
            raise ManifestError(f"{where}: spec.elasticPolicy: expected 1 <= minReplicas <= "
                                f"maxReplicas, got {lo} and {hi}")
        if not torchrun:
            raise ManifestError(f"{where}: spec.elasticPolicy: elastic jobs need torchrun "
                                "as the 'pytorch' container's command (it reads PET_*)")
        if elastic.rdzv_id is None:
            log.warning("%s: spec.elasticPolicy.rdzvId not set: the operator sets no "
                        "PET_RDZV_ID and torchrun uses the rendezvous id 'none'; a unique "
                        "rdzvId is safer (two jobs with the same rendezvous endpoint would "
                        "join each other)", where)
    return job


def check_pod_security(pod_spec: dict[str, Any], where: str) -> None:
    """Non-root, no escalation, no capabilities, seccomp, requests and limits."""
    pod_sc = pod_spec.get("securityContext") or {}
    for c in [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]:
        sc = {**pod_sc, **(c.get("securityContext") or {})}
        here = f"{where}: container {c.get('name')}"
        problems = []
        if sc.get("runAsNonRoot") is not True:
            problems.append("runAsNonRoot: true")
        if sc.get("runAsUser", 0) == 0:
            problems.append("runAsUser != 0")
        if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
            problems.append("allowPrivilegeEscalation: false")
        if "ALL" not in (((c.get("securityContext") or {}).get("capabilities") or {})
                         .get("drop") or []):
            problems.append("capabilities.drop: [ALL]")
        if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append("seccompProfile RuntimeDefault")
        res = c.get("resources") or {}
        if not res.get("requests") or not res.get("limits"):
            problems.append("resources.requests and limits")
        if problems:
            raise ManifestError(f"{here}: missing {', '.join(problems)}")


def pod_specs(doc: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod template in a Deployment/Job/PyTorchJob/Pod."""
    where = _where(doc)
    spec = doc.get("spec") or {}
    if doc.get("kind") == "Pod":
        yield where, spec
    elif doc.get("kind") == "PyTorchJob":
        for rtype, rspec in (spec.get("pytorchReplicaSpecs") or {}).items():
            yield f"{where} {rtype}", rspec["template"]["spec"]
    elif doc.get("kind") == "TrainJob":  # the pod as far as the TrainJob decides it
        from cnnflow.launch.trainjob import pod_view

        yield f"{where} trainer", pod_view(doc)
    elif "template" in spec and "spec" in (spec["template"] or {}):
        yield where, spec["template"]["spec"]


def validate_documents(docs: Iterable[dict[str, Any]], *, security: bool = True) -> int:
    """Validate each document (PyTorchJob, TrainJob or core kind); returns how many were
    checked. A ClusterTrainingRuntime (a local TrainJob's runtime) is read by
    `cnnflow.launch.trainjob_local`, not applied."""
    count = 0
    for doc in docs:
        if not doc:
            continue
        if doc.get("kind") == "PyTorchJob":
            validate_pytorchjob(doc)
        elif doc.get("kind") == "TrainJob":
            from cnnflow.launch.trainjob import validate_trainjob

            validate_trainjob(doc)
        elif doc.get("kind") == "ClusterTrainingRuntime":
            count += 1
            continue
        else:
            validate_core(doc)
        if security:
            for where, spec in pod_specs(doc):
                check_pod_security(spec, where)
        count += 1
    return count


def load_documents(source: str | Path) -> list[dict[str, Any]]:
    """All YAML documents of a file (or of YAML text when `source` is multi-line)."""
    text = source if isinstance(source, str) and "\n" in source else None
    label = "manifest" if text is not None else str(source)
    if text is None:
        path = Path(source)
        if not path.is_file():
            raise ManifestError(f"{path}: manifest file not found")
        text = path.read_text(encoding="utf-8")
    try:
        return [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ManifestError(f"{label}{line}: not valid YAML") from None
