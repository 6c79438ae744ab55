"""Render the train step as a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1)
with the `kubeflow-trainer-api` models, and check hand-written ones.

    rendered = render_trainjob(LaunchConfig(kind="trainjob", nodes=2), run_id="3f2a...",
                               params_yaml=text)
    print(rendered.to_yaml())            # ConfigMap (params.yaml) + TrainJob
    python -m cnnflow.launch.trainjob    # manifests/overlays/trainer-v2/trainjob.yaml

What the job looks like, and why:
- `spec.runtimeRef` names the ClusterTrainingRuntime (launch.runtime, default
  `torch-distributed`: one replicated Job `node`, container `node`, labelled
  `trainer.kubeflow.org/trainjob-ancestor-step: trainer`). The Trainer's torch plugin
  gives each node PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the pod's Job completion
  index), PET_MASTER_ADDR (`<job>-node-0-0.<job>`) and PET_MASTER_PORT (29500), and
  nothing else (no RANK or WORLD_SIZE), so the entrypoint is `torchrun -m cnnflow.train
  --params FILE`, the same single entrypoint as the PyTorchJob's.
- `spec.trainer`: image, command, numNodes, numProcPerNode (an int; the Trainer's
  default `auto` would start one process per CPU of resourcesPerNode), resourcesPerNode
  and env (the same run identity as the PyTorchJob's pods).
- What the trainer cannot say travels in one `spec.runtimePatches` entry (manager
  `cnnflow.launch`) for the replicated Job `node`: the pod labels, the volumes (the data
  PVC, /tmp, /dev/shm, the params ConfigMap) and their mounts, the pod and container
  securityContext, nodeSelector, tolerations (and terminationGracePeriodSeconds where
  the PyTorchJob's pods set one): the PyTorchJob's pod template, lifted field by field.
  v1alpha1 has no patch for automountServiceAccountToken, enableServiceLinks or
  imagePullPolicy: the runtime's values apply.
- `spec.activeDeadlineSeconds` = launch.active_deadline_s. There is no TTL, backoff or
  clean-pod field: the launcher deletes the job unless launch.keep_job, and the runtime
  decides restarts (JobSet: a failed node Job fails the TrainJob).

`validate_trainjob` checks a TrainJob dict: every field must exist in v1alpha1 (one line
naming the first that does not, e.g. an elastic policy), types through the models, a
DNS-1035 name, a runtimeRef, no PET_* in spec.trainer.env (the webhook's rule).
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from kubeflow_trainer_api import models as t
from pydantic import BaseModel, ValidationError

from cnnflow.configs.launch import LaunchConfig
from cnnflow.launch import run_paths
from cnnflow.launch.validate import ManifestError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
API_VERSION, KIND = f"{GROUP}/{VERSION}", "TrainJob"
RUNTIME_PLURAL, RUNTIME_KIND = "clustertrainingruntimes", "ClusterTrainingRuntime"
NODE = "node"  # torch-distributed's replicated Job and its training container
MANAGER = "cnnflow.launch"
ANCESTOR_LABEL, TRAINER_STEP = "trainer.kubeflow.org/trainjob-ancestor-step", "trainer"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
TRAINER_PORT = 29500
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                "PET_MASTER_PORT")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_HINTS = {"spec.podTemplateOverrides": "replaced by spec.runtimePatches in Trainer v2.2",
          "spec.elasticPolicy": "Trainer v2 has no elastic policy",
          "spec.trainer.elasticPolicy": "Trainer v2 has no elastic policy"}

# torch-distributed as Trainer v2.3 installs it (manifests/base/runtimes/torch_distributed.yaml),
# for the local backend when the YAML file brings no ClusterTrainingRuntime of its own.
TORCH_DISTRIBUTED: dict[str, Any] = {
    "apiVersion": API_VERSION, "kind": RUNTIME_KIND,
    "metadata": {"name": "torch-distributed",
                 "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}, "template": {"spec": {
        "replicatedJobs": [{"name": NODE, "template": {
            "metadata": {"labels": {ANCESTOR_LABEL: TRAINER_STEP}},
            "spec": {"template": {"spec": {"containers": [{
                "name": NODE, "image": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime"}]}}},
        }}]}}},
}


@dataclass
class RenderedTrainJob:
    """The TrainJob, the ConfigMap holding params.yaml (or None), and where outputs go."""

    job: t.TrainerV1alpha1TrainJob
    config_map: t.IoK8sApiCoreV1ConfigMap | None
    out_dir: str
    checkpoint_dir: str

    @property
    def name(self) -> str:
        return self.job.metadata.name

    def documents(self) -> list[dict[str, Any]]:
        """Plain dicts in creation order: the ConfigMap (if any), then the job."""
        docs = [self.config_map] if self.config_map is not None else []
        return [d.to_dict() for d in [*docs, self.job]]

    def to_yaml(self) -> str:
        from cnnflow.launch.pytorchjob import _Dumper

        return yaml.dump_all(self.documents(), Dumper=_Dumper, sort_keys=False)


def _lift(pod: dict[str, Any]) -> t.TrainerV1alpha1PodSpecPatch:
    """The PyTorchJob pod spec's fields a v1alpha1 PodSpecPatch can carry."""
    container = pod["containers"][0]
    keep = ("securityContext", "nodeSelector", "tolerations", "volumes",
            "terminationGracePeriodSeconds")
    patch = {k: pod[k] for k in keep if pod.get(k) is not None}
    patch["containers"] = [{"name": NODE, "securityContext": container["securityContext"],
                            "volumeMounts": container["volumeMounts"]}]
    return t.TrainerV1alpha1PodSpecPatch.from_dict(patch)


def render_trainjob(cfg: LaunchConfig, *, run_id: str = "", name: str = "",
                    params_yaml: str | None = None, parent_run_id: str = "",
                    identity: dict[str, str] | None = None) -> RenderedTrainJob:
    """Build the TrainJob (and its params ConfigMap) for one training run; the arguments
    mean what they mean for `cnnflow.launch.pytorchjob.render_job`."""
    from kubeflow.training.api_client import ApiClient

    from cnnflow.launch.pytorchjob import (
        _container,
        _pod_template,
        container_env,
        entry_argv,
        job_name,
        termination_grace_s,
    )

    name = name or job_name(cfg.name_prefix, run_id)
    out_dir, ckpt_dir = run_paths(cfg.mount_path, name)
    params_map = f"{name}-params" if params_yaml is not None else None
    argv = entry_argv(cfg, params_map)
    env = container_env(cfg, identity, parent_run_id)
    container = _container(cfg, argv, env, bool(params_map))
    template = ApiClient().sanitize_for_serialization(
        _pod_template(cfg, container, params_map, termination_grace_s(params_yaml)))
    labels = {"app.kubernetes.io/name": "cnnflow", "app.kubernetes.io/component": "train"}
    pod = t.TrainerV1alpha1PodTemplatePatch(
        metadata=t.IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels=labels),
        spec=_lift(template["spec"]))
    job_patch = t.TrainerV1alpha1JobTemplatePatch(spec=t.TrainerV1alpha1JobSpecPatch(template=pod))
    node = t.TrainerV1alpha1ReplicatedJobPatch(name=NODE, template=job_patch)
    patch = t.TrainerV1alpha1RuntimePatch(
        manager=MANAGER, training_runtime_spec=t.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=t.TrainerV1alpha1JobSetTemplatePatch(
                spec=t.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[node]))))
    trainer = t.TrainerV1alpha1Trainer(
        image=cfg.image, command=argv, num_nodes=cfg.nodes,
        num_proc_per_node=cfg.nproc_per_node,
        resources_per_node=t.IoK8sApiCoreV1ResourceRequirements.from_dict(
            template["spec"]["containers"][0]["resources"]),
        env=[t.IoK8sApiCoreV1EnvVar.from_dict(e)  # the values and the secretKeyRefs
             for e in template["spec"]["containers"][0]["env"]])
    job = t.TrainerV1alpha1TrainJob(
        api_version=API_VERSION, kind=KIND,
        metadata=t.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=cfg.namespace, labels=labels,
            annotations={"cnnflow/run-id": run_id} if run_id else None),
        spec=t.TrainerV1alpha1TrainJobSpec(
            runtime_ref=t.TrainerV1alpha1RuntimeRef(
                api_group=GROUP, kind=RUNTIME_KIND, name=cfg.runtime),
            trainer=trainer, runtime_patches=[patch],
            active_deadline_seconds=cfg.active_deadline_s))
    config_map = None
    if params_map:
        config_map = t.IoK8sApiCoreV1ConfigMap(
            api_version="v1", kind="ConfigMap", data={"params.yaml": params_yaml},
            metadata=t.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
                name=params_map, namespace=cfg.namespace, labels=labels))
    return RenderedTrainJob(job=job, config_map=config_map, out_dir=out_dir,
                            checkpoint_dir=ckpt_dir)


# ---------------------------------------------------------------------- validation

def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """(the pydantic model inside an annotation, "" | "list" | "dict")."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _model_of(inner[0]) if len(inner) == 1 else (None, "")
    if origin in (list, typing.List):  # noqa: UP006
        return _model_of(args[0])[0], "list"
    if origin in (dict, typing.Dict):  # noqa: UP006
        return _model_of(args[1])[0], "dict"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    return None, ""


def unknown_field(value: Any, model: type[BaseModel], path: str) -> str | None:
    """The path of the first key in `value` that `model` (recursively) does not have."""
    if not isinstance(value, dict):
        return None
    fields = {(f.alias or n): f for n, f in model.model_fields.items()}
    for key, item in value.items():
        here = f"{path}.{key}" if path else key
        if key not in fields:
            return here
        inner, shape = _model_of(fields[key].annotation)
        if inner is None:
            continue
        items = (list(enumerate(item)) if shape == "list" and isinstance(item, list) else
                 list(item.items()) if shape == "dict" and isinstance(item, dict) else
                 [(None, item)])
        for index, sub in items:
            where = here if index is None else f"{here}[{index}]"
            found = unknown_field(sub, inner, where)
            if found:
                return found
    return None


def _paths_ending(value: Any, key: str, path: str) -> list[str]:
    """Every path in `value` whose last key is `key`."""
    found: list[str] = []
    items = (value.items() if isinstance(value, dict) else
             ((f"[{i}]", v) for i, v in enumerate(value)) if isinstance(value, list) else ())
    for k, v in items:
        here = f"{path}{k}" if str(k).startswith("[") else f"{path}.{k}" if path else str(k)
        if k == key:
            found.append(here)
        found += _paths_ending(v, key, here)
    return found


def validate_trainjob(doc: dict[str, Any]) -> t.TrainerV1alpha1TrainJob:
    """v1alpha1's fields and types, plus the Trainer webhook's rules; the model."""
    where = f"TrainJob {(doc.get('metadata') or {}).get('name', '?')}"
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        raise ManifestError(f"{where}: expected apiVersion {API_VERSION}, kind {KIND}")
    field = unknown_field({k: v for k, v in doc.items() if k != "status"},
                          t.TrainerV1alpha1TrainJob, "")
    if field:
        hint = _HINTS.get(field) or "see the TrainJob API reference"
        raise ManifestError(f"{where}: {field}: not a field of {API_VERSION} {KIND} "
                            f"(Trainer v2.3; {hint})")
    if not isinstance(doc.get("spec"), dict) or not doc["spec"].get("runtimeRef"):
        raise ManifestError(f"{where}: spec.runtimeRef: required (the runtime to run, e.g. "
                            "{name: torch-distributed})")
    try:
        job = t.TrainerV1alpha1TrainJob.from_dict(doc)
    except (ValidationError, ValueError, TypeError, KeyError) as exc:
        what = str(exc)
        if isinstance(exc, ValidationError):  # from_dict validates level by level: its
            first = exc.errors()[0]  # loc is relative, so find where in the doc it is
            loc = [str(p) for p in first["loc"]]
            paths = _paths_ending(doc, loc[0], "") if loc else []
            head = paths[0] if len(paths) == 1 else loc[0] if loc else ""
            what = ".".join([head, *loc[1:]]) + ": " + first["msg"]
        raise ManifestError(f"{where}: not a valid {KIND}: {what}") from None
    name = job.metadata.name if job.metadata else None
    if not name or len(name) > 63 or not _DNS1035.match(name):
        raise ManifestError(f"{where}: metadata.name: expected a DNS-1035 label "
                            f"(a-z first, a-z0-9-, <= 63 chars), got {name!r}")
    trainer = job.spec.trainer
    if trainer is not None:
        reserved = sorted({e.name for e in trainer.env or []} & set(RESERVED_ENV))
        if reserved:
            raise ManifestError(f"{where}: spec.trainer.env: must not set {', '.join(reserved)}"
                                " (the torch runtime sets them)")
        for key, value in (("numNodes", trainer.num_nodes),
                           ("numProcPerNode", trainer.num_proc_per_node)):
            if value is not None and value < 1:
                raise ManifestError(f"{where}: spec.trainer.{key}: expected >= 1, got {value}")
    return job


def pod_view(doc: dict[str, Any]) -> dict[str, Any]:
    """The trainer's pod spec as far as the TrainJob alone decides it (image, resources,
    securityContext, volumes from its runtimePatches), for the image and security checks."""
    trainer = (doc.get("spec") or {}).get("trainer") or {}
    pod: dict[str, Any] = {}
    container: dict[str, Any] = {"name": NODE}
    for entry in (doc.get("spec") or {}).get("runtimePatches") or []:
        jobs = ((((entry.get("trainingRuntimeSpec") or {}).get("template") or {})
                 .get("spec") or {}).get("replicatedJobs")) or []
        for rjob in jobs:
            spec = ((((rjob.get("template") or {}).get("spec") or {}).get("template") or {})
                    .get("spec")) or {}
            pod.update({k: v for k, v in spec.items() if k != "containers"})
            for c in spec.get("containers") or []:
                if c.get("name") == NODE:
                    container.update(c)
    if trainer.get("image"):
        container["image"] = trainer["image"]
    if trainer.get("resourcesPerNode"):
        container["resources"] = trainer["resourcesPerNode"]
    return {**pod, "containers": [container]}


def example_yaml() -> str:
    """manifests/overlays/trainer-v2/trainjob.yaml: the default TrainJob (2 nodes) with a
    fixed name, no namespace (kustomize sets it), and its params ConfigMap."""
    import dataclasses
    from pathlib import Path

    from cnnflow.config import Params, to_dict
    from cnnflow.launch import resolve_job
    from cnnflow.launch.pytorchjob import _Dumper

    cfg, name = LaunchConfig(kind="trainjob", nodes=2), "cnnflow-trainjob-example"
    final = resolve_job(dataclasses.replace(Params(), launch=cfg), name=name,
                        shards=f"{cfg.mount_path}/data/shards",
                        workspace=Path("/nonexistent"), root=cfg.mount_path, cluster=True)
    docs = render_trainjob(cfg, name=name, params_yaml=yaml.safe_dump(
        to_dict(final), sort_keys=False)).documents()
    for doc in docs:
        del doc["metadata"]["namespace"]
    header = ("# Generated by `python -m cnnflow.launch.trainjob`; the launcher renders one\n"
              "# per run (unique name, its resolved params, run ids). Kept in sync by a test.\n")
    return header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


if __name__ == "__main__":
    print(example_yaml(), end="")
