"""Run a TrainJob (Kubeflow Trainer v2) on this machine, as `LocalJob` runs a PyTorchJob.

    rc = run_local("trainjob.yaml", mounts={"/workspace": "."})   # cnnflow launch FILE --local

The TrainJob is resolved against its runtime the way the Trainer does it, then each
node runs as one process group (`LocalJob`'s replicas, labelled node-0, node-1, ...):
- The runtime: a ClusterTrainingRuntime (or TrainingRuntime) of the runtimeRef's name in
  the same YAML file, else the built-in description of `torch-distributed`
  (cnnflow.launch.trainjob.TORCH_DISTRIBUTED). Only torch runtimes (mlPolicy.torch) run.
- The trainer step is the replicated Job labelled trainjob-ancestor-step=trainer, its
  container `node`. spec.trainer overrides image, command, args, resources and merges
  env; the runtimePatches for that Job add volumes, mounts, env, securityContext.
- Each node gets the env the Trainer's torch plugin sets (pkg/runtime/framework/
  plugins/torch): PET_NNODES = numNodes (trainer, else mlPolicy, else 1),
  PET_NPROC_PER_NODE = numProcPerNode (or "auto": one per CPU of resourcesPerNode when
  it asks for no GPU), PET_NODE_RANK = the node's Job completion index, PET_MASTER_ADDR =
  127.0.0.1 (on a cluster `<job>-node-0-0.<job>`) and PET_MASTER_PORT = a free port (on a
  cluster 29500). fieldRef metadata.annotations['batch.kubernetes.io/job-completion-index']
  resolves to the index, metadata.name to `<job>-node-0-<index>`.
- Exit semantics (JobSet's): the job succeeds when every node exited 0; a node's
  non-zero exit restarts it under the pod's restartPolicy (default OnFailure, as JobSet
  defaults it) until the Job's backoffLimit (default 6, the Kubernetes Job default)
  is used up, then the job fails and the other nodes are stopped;
  spec.activeDeadlineSeconds caps its wall time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cnnflow.launch import operator
from cnnflow.launch.local import LocalJob
from cnnflow.launch.trainjob import (
    ANCESTOR_LABEL,
    INDEX_LABEL,
    KIND,
    NODE,
    RUNTIME_KIND,
    TORCH_DISTRIBUTED,
    TRAINER_STEP,
    validate_trainjob,
)
from cnnflow.launch.validate import ManifestError, load_documents

JOB_BACKOFF_LIMIT = 6  # batch/v1 Job's default
RUNTIME_KINDS = (RUNTIME_KIND, "TrainingRuntime")
_POD_FIELDS = ("affinity", "imagePullSecrets", "nodeSelector", "schedulingGates",
               "securityContext", "serviceAccountName", "terminationGracePeriodSeconds",
               "tolerations")


def _docs(source: Any) -> list[dict[str, Any]]:
    if hasattr(source, "documents"):
        return source.documents()
    if isinstance(source, dict):
        return [source]
    if isinstance(source, (str, Path)):
        return load_documents(source)
    return list(source)


def _merge(items: list[dict[str, Any]], new: list[dict[str, Any]], key: str) -> list:
    """`items` with `new` upserted by `key` (env by name, volumes by name)."""
    out = {i[key]: i for i in items}
    out.update({i[key]: i for i in new})
    return list(out.values())


def cpu_count(quantity: str | None) -> int:
    """A CPU quantity rounded up to whole CPUs, as Quantity.Value() does ("500m" -> 1)."""
    if not quantity:
        return 0
    text = str(quantity)
    return math.ceil(int(text[:-1]) / 1000 if text.endswith("m") else float(text))


def _runtime(job: dict[str, Any], docs: list[dict[str, Any]], where: str) -> dict[str, Any]:
    ref = job["spec"]["runtimeRef"]
    name, kind = ref["name"], ref.get("kind") or RUNTIME_KIND
    found = [d for d in docs if d.get("kind") in RUNTIME_KINDS
             and (d.get("metadata") or {}).get("name") == name]
    if found:
        runtime = found[0]
    elif name == TORCH_DISTRIBUTED["metadata"]["name"] and kind == RUNTIME_KIND:
        runtime = TORCH_DISTRIBUTED
    else:
        raise ManifestError(f"{where}: spec.runtimeRef.name: {kind} {name!r} is neither in "
                            "the job file nor built in (torch-distributed): add its "
                            f"{kind} document to the file")
    if "torch" not in ((runtime.get("spec") or {}).get("mlPolicy") or {}):
        raise ManifestError(f"{where}: {kind} {name}: spec.mlPolicy.torch: only torch "
                            "runtimes run locally")
    return runtime


def _trainer_job(runtime: dict[str, Any], where: str) -> dict[str, Any]:
    jobs = ((runtime["spec"].get("template") or {}).get("spec") or {}).get(
        "replicatedJobs") or []
    for rjob in jobs:
        labels = ((rjob.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if labels.get(ANCESTOR_LABEL) == TRAINER_STEP:
            return copy.deepcopy(rjob)
    raise ManifestError(f"{where}: runtime {runtime['metadata']['name']}: no replicatedJob "
                        f"labelled {ANCESTOR_LABEL}: {TRAINER_STEP}")


def _patch(pod: dict[str, Any], job: dict[str, Any], rjob_name: str) -> None:
    """Apply the runtimePatches for replicated Job `rjob_name` to its pod spec."""
    for entry in job["spec"].get("runtimePatches") or []:
        spec = ((entry.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec")
        for rj in (spec or {}).get("replicatedJobs") or []:
            if rj.get("name") != rjob_name:
                continue
            patch = ((((rj.get("template") or {}).get("spec") or {}).get("template") or {})
                     .get("spec")) or {}
            pod.update({k: patch[k] for k in _POD_FIELDS if k in patch})
            pod["volumes"] = _merge(pod.get("volumes") or [], patch.get("volumes") or [],
                                    "name")
            for cp in patch.get("containers") or []:
                target = next((c for c in pod["containers"] if c["name"] == cp["name"]), None)
                if target is None:
                    continue  # the Trainer refuses this; locally only node matters
                target["env"] = _merge(target.get("env") or [], cp.get("env") or [], "name")
                target["volumeMounts"] = _merge(target.get("volumeMounts") or [],
                                                cp.get("volumeMounts") or [], "mountPath")
                if cp.get("securityContext"):
                    target["securityContext"] = cp["securityContext"]


class LocalTrainJob(LocalJob):
    """Plan and supervise the nodes of one TrainJob (see the module docstring)."""

    replica_types = ("Node",)
    container = NODE
    kind = KIND
    master_label = "node-0"

    def _load(self, source: Any) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
        docs = _docs(source)
        jobs = [d for d in docs if d.get("kind") == KIND]
        if len(jobs) != 1:
            raise ManifestError(f"expected exactly one TrainJob in the job file, found "
                                f"{len(jobs)}")
        job = jobs[0]
        validate_trainjob(job)
        meta, spec = job["metadata"], job["spec"]
        where = f"TrainJob {meta['name']}"
        runtime = _runtime(job, docs, where)
        rjob = _trainer_job(runtime, where)
        job_spec = (rjob.get("template") or {}).get("spec") or {}
        pod = copy.deepcopy(((job_spec.get("template") or {}).get("spec")) or {})
        node = next((c for c in pod.get("containers") or [] if c.get("name") == NODE), None)
        if node is None:
            raise ManifestError(f"{where}: runtime {runtime['metadata']['name']}: the trainer "
                                f"Job has no container named {NODE!r}")
        trainer = spec.get("trainer") or {}
        for key, field in (("image", "image"), ("command", "command"), ("args", "args"),
                           ("resourcesPerNode", "resources")):
            if trainer.get(key) is not None:
                node[field] = trainer[key]
        node["env"] = _merge(node.get("env") or [], trainer.get("env") or [], "name")
        _patch(pod, job, rjob["name"])
        if not node.get("command") and not operator.is_project_image(node.get("image", "")):
            raise ManifestError(f"{where}: spec.trainer.command: required to run locally "
                                f"(the ENTRYPOINT of image {node.get('image')!r} is unknown "
                                "here)")
        ml = runtime["spec"].get("mlPolicy") or {}
        self.num_nodes = int(trainer.get("numNodes") or ml.get("numNodes") or 1)
        self.nproc = str(trainer.get("numProcPerNode") or self._auto(node))
        maps = {d["metadata"]["name"]: dict(d.get("data") or {})
                for d in docs if d.get("kind") == "ConfigMap"}
        synthetic = {
            "apiVersion": job["apiVersion"], "kind": KIND,
            "metadata": {"name": meta["name"], "namespace": meta.get("namespace") or "default"},
            "spec": {"runPolicy": {
                "activeDeadlineSeconds": spec.get("activeDeadlineSeconds"),
                "backoffLimit": job_spec.get("backoffLimit", JOB_BACKOFF_LIMIT)},
                "pytorchReplicaSpecs": {"Node": {
                    "replicas": self.num_nodes, "template": {"spec": pod},
                    "restartPolicy": pod.get("restartPolicy") or "OnFailure"}}},
        }
        return synthetic, maps

    @staticmethod
    def _auto(node: dict[str, Any]) -> str:
        """numProcPerNode `auto`: the torch plugin's choice for the node's resources."""
        res = node.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        gpus = requests.get("nvidia.com/gpu") or limits.get("nvidia.com/gpu")
        if gpus and int(gpus) > 0:
            return "auto"
        return str(max(1, cpu_count(requests.get("cpu") or limits.get("cpu"))))

    def _pod_fields(self, rtype: str, index: int) -> dict[str, str]:
        fields = operator.pod_fields(self.doc, rtype, index)
        fields["metadata.name"] = f"{self.name}-node-0-{index}"
        fields[f"metadata.annotations['{INDEX_LABEL}']"] = str(index)
        fields[f"metadata.labels['{INDEX_LABEL}']"] = str(index)
        return fields

    def _pod_env(self, rtype: str, index: int, master_port: int, rdzv_port: int) -> dict:
        return {"PET_NNODES": str(self.num_nodes), "PET_NPROC_PER_NODE": self.nproc,
                "PET_NODE_RANK": str(index), "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(master_port)}

    def _succeeded(self, has_master: bool) -> bool:
        return all(r.done for r in self.replicas)


def run_local(job: Any, *, mounts: Mapping[str, str] | None = None,
              env: Mapping[str, str] | None = None, workdir: str | Path | None = None,
              echo: Callable[[str], None] | None = None, **kwargs: Any) -> int:
    """Run a TrainJob (path to YAML, dict, list of documents or `RenderedTrainJob`) here.
    Returns 0 when it succeeded, else the failing node's exit code (>= 1)."""
    result = LocalTrainJob(job, mounts=mounts, env=env, workdir=workdir, echo=echo,
                           **kwargs).run()
    return 0 if result.succeeded else max(1, result.exit_code)
