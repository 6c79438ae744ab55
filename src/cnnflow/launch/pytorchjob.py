"""Render the train step as a `PyTorchJob` (kubeflow.org/v1) with the kubeflow-training SDK.

    rendered = render_job(LaunchConfig(nodes=2), run_id="3f2a...", params_yaml=text)
    print(rendered.to_yaml())           # ConfigMap (params.yaml) + PyTorchJob
    python -m cnnflow.launch.pytorchjob > manifests/base/pytorchjob.yaml   # the example

What the job looks like, and why:
- Master x 1 + Worker x (nodes - 1); elastic jobs have Workers only, because the
  operator's rendezvous endpoint defaults to <job>-worker-0 and scaling acts on Workers.
- The container is named `pytorch` (the operator looks for it) and runs the single
  training entrypoint: `python -m cnnflow.train` (the operator sets RANK, WORLD_SIZE,
  MASTER_ADDR/PORT) or, for nproc_per_node > 1 or elastic jobs, `python -m
  cnnflow.train.torchrun -m cnnflow.train`: torchrun (it reads the PET_* variables the
  operator sets) that exits 143, not 1, when the pod is preempted.
- Preemption (SIGTERM) is a normal event: the ranks finish the step and checkpoint
  within checkpoint.preempt_budget_s and exit 143, which restartPolicy ExitCode retries
  (`cnnflow.train.preempt`); terminationGracePeriodSeconds is that budget plus
  `GRACE_MARGIN_S`, so the kubelet's SIGKILL comes only after it.
- The final params.yaml travels in a ConfigMap owned by the job (mounted read-only), the
  pods' only input; shards, checkpoints and outputs live on a PVC under
  <mount_path>/runs/<job>/, so a restarted pod resumes from its checkpoints and the next
  pipeline step finds the model.
- Pods run as uid 1000, no privilege escalation, all capabilities dropped, read-only
  root filesystem (/tmp and /dev/shm are emptyDirs), seccomp RuntimeDefault, and
  without a service-account token (training never calls the API server).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from kubeflow.training import models as m
from kubeflow.training.api_client import ApiClient

from cnnflow.configs.launch import CREDENTIAL_KEYS, MAX_JOB_NAME, STORAGE_KEYS, LaunchConfig
from cnnflow.launch import run_paths

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER = "pytorch"
PORT_NAME = "pytorchjob-port"
PARAMS_DIR = "/etc/cnnflow"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
GRACE_MARGIN_S = 10  # process start-up of the signal handler, torchrun's own shutdown


def termination_grace_s(params_yaml: str | None) -> int:
    """terminationGracePeriodSeconds: the pods' checkpoint.preempt_budget_s (from the
    params.yaml they train with, else the default) plus GRACE_MARGIN_S."""
    from cnnflow.configs.checkpoint import CheckpointConfig

    budget = CheckpointConfig().preempt_budget_s
    if params_yaml:
        section = (yaml.safe_load(params_yaml) or {}).get("checkpoint") or {}
        budget = float(section.get("preempt_budget_s", budget))
    return int(math.ceil(budget)) + GRACE_MARGIN_S


def job_name(prefix: str, run_id: str = "") -> str:
    """`<prefix>-<8 hex>`: derived from the run id (stable for a run), random without one."""
    suffix = hashlib.sha256(run_id.encode()).hexdigest()[:8] if run_id else uuid.uuid4().hex[:8]
    return f"{prefix}-{suffix}"[:MAX_JOB_NAME]


@dataclass
class RenderedJob:
    """The PyTorchJob, the ConfigMap holding params.yaml (or None), and where outputs go."""

    job: m.KubeflowOrgV1PyTorchJob
    config_map: m.V1ConfigMap | None
    out_dir: str
    checkpoint_dir: str

    @property
    def name(self) -> str:
        return self.job.metadata.name

    def documents(self) -> list[dict[str, Any]]:
        """Plain dicts in creation order: the ConfigMap (if any), then the job."""
        client = ApiClient()
        docs = [self.config_map] if self.config_map is not None else []
        return [client.sanitize_for_serialization(d) for d in [*docs, self.job]]

    def to_yaml(self) -> str:
        return yaml.dump_all(self.documents(), Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the params.yaml in the ConfigMap) as readable `|` blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _kv(items: Sequence[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def secret_env(cfg: LaunchConfig) -> list[m.V1EnvVar]:
    """MLflow's login (launch.mlflow_secret) and the object store's (launch.storage_secret)
    as secretKeyRefs, each optional: no Secret, no variable. The values never pass through
    the launcher or the params."""
    pairs = [(cfg.mlflow_secret, CREDENTIAL_KEYS), (cfg.storage_secret, STORAGE_KEYS)]
    return [m.V1EnvVar(name=var, value_from=m.V1EnvVarSource(secret_key_ref=m.V1SecretKeySelector(
        name=secret, key=key, optional=True)))
        for secret, keys in pairs if secret for key, var in keys.items()]


def _container(cfg: LaunchConfig, args: list[str], env: dict[str, str],
               params: bool) -> m.V1Container:
    requests = {"cpu": cfg.cpu, "memory": cfg.memory}
    limits = {"cpu": cfg.cpu_limit or cfg.cpu, "memory": cfg.memory_limit or cfg.memory}
    if cfg.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(cfg.gpus)
    mounts = [
        m.V1VolumeMount(name="data", mount_path=cfg.mount_path),
        m.V1VolumeMount(name="tmp", mount_path="/tmp"),
        m.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
    ]
    if params:
        mounts.append(m.V1VolumeMount(name="params", mount_path=PARAMS_DIR, read_only=True))
    return m.V1Container(
        name=CONTAINER,
        image=cfg.image,
        image_pull_policy="IfNotPresent",
        command=args[:1],
        args=args[1:],
        env=[m.V1EnvVar(name=k, value=v) for k, v in env.items()] + secret_env(cfg),
        ports=[m.V1ContainerPort(name=PORT_NAME, container_port=cfg.port, protocol="TCP")],
        resources=m.V1ResourceRequirements(requests=requests, limits=limits),
        volume_mounts=mounts,
        security_context=m.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            run_as_non_root=True,
            run_as_user=1000,
            capabilities=m.V1Capabilities(drop=["ALL"]),
        ),
    )


def _pod_template(cfg: LaunchConfig, container: m.V1Container,
                  params_map: str | None, grace_s: int) -> m.V1PodTemplateSpec:
    volumes = [
        m.V1Volume(name="data", persistent_volume_claim=m.V1PersistentVolumeClaimVolumeSource(
            claim_name=cfg.volume_claim)),
        m.V1Volume(name="tmp", empty_dir=m.V1EmptyDirVolumeSource(size_limit="2Gi")),
        m.V1Volume(name="dshm", empty_dir=m.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=cfg.shm_size)),
    ]
    if params_map:
        volumes.append(m.V1Volume(name="params", config_map=m.V1ConfigMapVolumeSource(
            name=params_map)))
    tolerations = None
    if cfg.gpus:
        tolerations = [m.V1Toleration(key="nvidia.com/gpu", operator="Exists",
                                      effect="NoSchedule")]
    return m.V1PodTemplateSpec(
        metadata=m.V1ObjectMeta(labels={"app.kubernetes.io/name": "cnnflow",
                                        "app.kubernetes.io/component": "train"}),
        spec=m.V1PodSpec(
            containers=[container],
            volumes=volumes,
            automount_service_account_token=False,
            enable_service_links=False,
            termination_grace_period_seconds=grace_s,
            node_selector=_kv(cfg.node_selector) or None,
            tolerations=tolerations,
            security_context=m.V1PodSecurityContext(
                run_as_non_root=True, run_as_user=1000, run_as_group=1000, fs_group=1000,
                seccomp_profile=m.V1SeccompProfile(type="RuntimeDefault"),
            ),
        ),
    )


def entry_argv(cfg: LaunchConfig, params_map: str | None) -> list[str]:
    """The training container's argv: the single entrypoint, `--params FILE` only."""
    if cfg.uses_torchrun:
        # Non-elastic: PET_NNODES/NODE_RANK/MASTER_*/NPROC_PER_NODE come from the operator
        # (or the Trainer). Elastic jobs without a Master get no PET_NPROC_PER_NODE from
        # the operator, so pass it here.
        argv = ["python", "-m", "cnnflow.train.torchrun"]  # torchrun, exit 143 on SIGTERM
        if cfg.elastic:
            argv.append(f"--nproc-per-node={cfg.nproc_per_node}")
        argv += ["-m", "cnnflow.train"]
    else:
        argv = ["python", "-m", "cnnflow.train"]
    if params_map:
        argv += ["--params", f"{PARAMS_DIR}/params.yaml"]
    return argv


def container_env(cfg: LaunchConfig, identity: dict[str, str] | None,
                  parent_run_id: str) -> dict[str, str]:
    """The run's identity (not parameters) for the pods: lineage tags, the MLflow parent
    run, the image; then launch.env."""
    env = {"HOME": "/tmp", **(identity or {})}
    if parent_run_id:
        env["CNNFLOW_PARENT_RUN_ID"] = parent_run_id
    if cfg.backend == "kubernetes":
        env["CNNFLOW_IMAGE"] = cfg.image
    env.update(_kv(cfg.env))
    return env


def render_job(cfg: LaunchConfig, *, run_id: str = "", name: str = "",
               params_yaml: str | None = None, parent_run_id: str = "",
               identity: dict[str, str] | None = None) -> RenderedJob:
    """Build the PyTorchJob (and its params ConfigMap) for one training run.

    `run_id` makes the job name (unique per run); `name` overrides it. `params_yaml` is
    the final params.yaml the pods train with (`cnnflow.launch.resolve_job`: shards,
    outputs and checkpoints already set), the pods' one input: their argv is only
    `--params FILE`. None = the image's own params.yaml. `identity` is the launching
    process's run identity, passed on to the pods as environment variables (not
    parameters): KFP_RUN_ID, CNNFLOW_RUNNER, CNNFLOW_GIT_COMMIT/DIRTY (`launch.identity`).
    """
    name = name or job_name(cfg.name_prefix, run_id)
    out_dir, ckpt_dir = run_paths(cfg.mount_path, name)
    params_map = f"{name}-params" if params_yaml is not None else None

    argv = entry_argv(cfg, params_map)
    env = container_env(cfg, identity, parent_run_id)
    template = _pod_template(cfg, _container(cfg, argv, env, bool(params_map)), params_map,
                             termination_grace_s(params_yaml))
    replica = {"restart_policy": cfg.restart_policy, "template": template}
    if cfg.elastic:
        specs = {"Worker": m.KubeflowOrgV1ReplicaSpec(replicas=cfg.nodes, **replica)}
        elastic = m.KubeflowOrgV1ElasticPolicy(
            min_replicas=cfg.elastic_min_nodes, max_replicas=cfg.elastic_max_nodes,
            max_restarts=cfg.max_restarts, rdzv_backend="c10d", rdzv_id=name,
        )
    else:
        specs = {"Master": m.KubeflowOrgV1ReplicaSpec(replicas=1, **replica)}
        if cfg.nodes > 1:
            specs["Worker"] = m.KubeflowOrgV1ReplicaSpec(replicas=cfg.nodes - 1, **replica)
        elastic = None

    labels = {"app.kubernetes.io/name": "cnnflow", "app.kubernetes.io/component": "train"}
    annotations = {"cnnflow/run-id": run_id} if run_id else None
    job = m.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=m.V1ObjectMeta(name=name, namespace=cfg.namespace, labels=labels,
                                annotations=annotations),
        spec=m.KubeflowOrgV1PyTorchJobSpec(
            pytorch_replica_specs=specs,
            nproc_per_node=str(cfg.nproc_per_node),
            elastic_policy=elastic,
            run_policy=m.KubeflowOrgV1RunPolicy(
                clean_pod_policy=cfg.clean_pod_policy,
                backoff_limit=cfg.backoff_limit,
                active_deadline_seconds=cfg.active_deadline_s,
                ttl_seconds_after_finished=cfg.ttl_after_finished_s,
            ),
        ),
    )
    config_map = None
    if params_map:
        config_map = m.V1ConfigMap(
            api_version="v1", kind="ConfigMap",
            metadata=m.V1ObjectMeta(name=params_map, namespace=cfg.namespace, labels=labels),
            data={"params.yaml": params_yaml},
        )
    return RenderedJob(job=job, config_map=config_map, out_dir=out_dir,
                       checkpoint_dir=ckpt_dir)


def example_yaml() -> str:
    """manifests/base/pytorchjob.yaml: the default job (2 nodes) with a fixed name, no
    namespace (kustomize sets it) and its params ConfigMap: the defaults, resolved as the
    train step resolves them."""
    import dataclasses
    from pathlib import Path

    from cnnflow.config import Params, to_dict
    from cnnflow.launch import resolve_job

    cfg, name = LaunchConfig(nodes=2), "cnnflow-train-example"
    final = resolve_job(dataclasses.replace(Params(), launch=cfg), name=name,
                        shards=f"{cfg.mount_path}/data/shards",
                        workspace=Path("/nonexistent"), root=cfg.mount_path,
                        cluster=True)
    rendered = render_job(cfg, name=name,
                          params_yaml=yaml.safe_dump(to_dict(final), sort_keys=False))
    docs = rendered.documents()
    for doc in docs:
        del doc["metadata"]["namespace"]
    header = ("# Generated by `python -m cnnflow.launch.pytorchjob`; the launcher renders one\n"
              "# per run (unique name, its resolved params, run ids). Kept in sync by a test.\n")
    return header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


if __name__ == "__main__":
    print(example_yaml(), end="")
