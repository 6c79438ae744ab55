"""The `launch` section of params.yaml: how the train step becomes a Kubeflow job, a
`PyTorchJob` (Training Operator v1) or a `TrainJob` (Trainer v2) (owner: `cnnflow.launch`).
It imports only the stdlib and `cnnflow.errors`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from cnnflow.errors import check_config as _check

# <name>[:<tag>][@sha256:<hex>] with an optional registry host:port/ prefix.
_IMAGE = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
# A Kubernetes quantity: 500m, 2, 1.5, 4Gi, 512Mi, 1e3.
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# Pod names are <job>-worker-<index> and the operator makes a Service of the same name, so
# the job name leaves room for "-worker-" plus up to 6 index digits within 63 characters.
MAX_JOB_NAME = 48


CREDENTIAL_KEYS = {"username": "MLFLOW_TRACKING_USERNAME",
                   "password": "MLFLOW_TRACKING_PASSWORD"}
"""The keys of launch.mlflow_secret and the variables MLflow's client reads them from."""
STORAGE_KEYS = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                     "AWS_ENDPOINT_URL")}
"""The keys of launch.storage_secret: the variables boto3/s3fs read (cnnflow.storage)."""


def check_image(image: str, key: str = "launch.image") -> str:
    """Refuse an image reference without a tag or digest (`cnnflow` -> error, `cnnflow:0.1`)."""
    match = _IMAGE.match(image or "")
    _check(
        bool(match) and bool(match["tag"] or match["digest"]),
        key,
        "an image with a tag or digest, e.g. cnnflow:0.1.0 (an untagged image means "
        "':latest', which changes under a running job)",
        image,
    )
    return image


@dataclass(kw_only=True)
class LaunchConfig:
    """Where and how `train` runs: local processes or a job on a cluster."""

    kind: Literal["pytorchjob", "trainjob"] = "pytorchjob"
    """pytorchjob = kubeflow.org/v1 PyTorchJob (Training Operator v1.x); trainjob =
    trainer.kubeflow.org/v1alpha1 TrainJob (Kubeflow Trainer v2) referencing
    `runtime`. Options marked "pytorchjob only" have no TrainJob field: there the
    runtime decides (restarts, backoff, port 29500, pod clean-up)."""
    runtime: str = "torch-distributed"
    """trainjob only: the ClusterTrainingRuntime the TrainJob references (runtimeRef)."""
    backend: Literal["local", "kubernetes"] = "local"
    """local = one process group per replica on this machine, with the env a PyTorchJob
    pod gets; kubernetes = create the PyTorchJob, follow it, clean up."""
    image: str = "cnnflow:0.1.0"
    """Container image with a tag or digest (built from the repository's Dockerfile)."""
    namespace: str = "cnnflow"
    name_prefix: str = "cnnflow-train"
    """Job name = <prefix>-<8 hex of the run id>: unique per run, DNS-1035, <= 48 chars
    (pods are named <job>-worker-<i> and must stay <= 63)."""
    nodes: int = 1
    """Pods: 1 Master + (nodes - 1) Workers (elastic: Workers only, see elastic_*);
    a TrainJob's trainer.numNodes."""
    nproc_per_node: int = 1
    """Processes per pod: 1 = `python -m cnnflow.train`, > 1 = torchrun (one per GPU)."""
    launcher: Literal["auto", "python", "torchrun"] = "auto"
    """auto = torchrun when nproc_per_node > 1, the job is elastic or a TrainJob (the
    Trainer sets only PET_*), else plain python."""
    cpu: str = "2"
    """CPU request per pod (Kubernetes quantity); the limit is `cpu_limit` or this."""
    memory: str = "4Gi"
    cpu_limit: str = ""
    memory_limit: str = ""
    """"" = the request (Guaranteed QoS when cpu and memory limits equal requests)."""
    gpus: int = 0
    """nvidia.com/gpu per pod (requests = limits, as extended resources require)."""
    shm_size: str = "1Gi"
    """Memory-backed /dev/shm: DataLoader workers and NCCL use shared memory; the
    container runtime's default of 64 MiB is too small."""
    volume_claim: str = "cnnflow-data"
    """PVC holding shards, checkpoints and outputs (never the pod's own filesystem)."""
    mount_path: str = "/workspace"
    """Where the claim is mounted; outputs go to <mount_path>/runs/<job name>/."""
    dataset_uri: str = ""
    """Shards as the pods see them ("" = <mount_path>/data/shards)."""
    tracking_uri: str = "http://mlflow.cnnflow.svc.cluster.local:5000"
    """MLFLOW_TRACKING_URI for the pods ("" = no tracking)."""
    port: int = 23456
    """Master's `pytorchjob-port` container port (the operator's default). pytorchjob
    only: a TrainJob's nodes meet on the Trainer's port 29500."""
    restart_policy: Literal["OnFailure", "ExitCode", "Never", "Always"] = "OnFailure"
    """OnFailure/Always: restart the container in place; ExitCode: recreate the pod on a
    retryable exit code (>= 128, e.g. 137 OOM-kill/preemption), fail on 1-127; Never.
    pytorchjob only."""
    backoff_limit: int = 3
    """Restarts before the job is marked Failed (pytorchjob only)."""
    active_deadline_s: int = 7200
    """runPolicy.activeDeadlineSeconds (a TrainJob's spec.activeDeadlineSeconds): a job
    still running (or never scheduled) after this many seconds is failed by the operator,
    and the launcher says so."""
    ttl_after_finished_s: int = 3600
    """runPolicy.ttlSecondsAfterFinished: the operator deletes the finished job after it
    (pytorchjob only)."""
    clean_pod_policy: Literal["None", "Running", "All"] = "Running"
    """Pods deleted when the job finishes: Running = stragglers only (logs of finished
    pods stay readable), All, None (the operator's default). pytorchjob only."""
    elastic_min_nodes: int = 0
    elastic_max_nodes: int = 0
    """Both > 0 = elastic: Workers only, torchrun c10d rendezvous, nodes in [min, max].
    pytorchjob only: Trainer v2 has no elastic policy."""
    max_restarts: int = 3
    """elastic only: torchrun worker-group restarts (elasticPolicy.maxRestarts)."""
    keep_job: bool = False
    """Keep the job (and its pods, per clean_pod_policy) after it finished;
    false = delete it as soon as the launcher has its result and logs."""
    env: list[str] = field(default_factory=list)
    """Extra NAME=value variables for the training container."""
    mlflow_secret: str = "mlflow-client"
    """Secret whose `username` and `password` keys the training pods get as
    MLFLOW_TRACKING_USERNAME/PASSWORD (MLflow's basic auth, manifests/base/mlflow.yaml);
    optional: without that Secret the pods send no credentials. "" = never."""
    storage_secret: str = "cnnflow-storage"
    """Secret whose AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL keys the
    training pods (and the pipeline's steps) get as those variables, for s3:// shards,
    checkpoints and models; optional, each key too. "" = never."""
    node_selector: list[str] = field(default_factory=list)
    """key=value node labels the pods must match (e.g. a GPU node pool)."""
    local_mounts: list[str] = field(default_factory=list)
    """local backend: mountPath=DIR pairs mapping the spec's volumes to local
    directories ("" = the claim's mount_path maps to the current directory)."""

    def __post_init__(self) -> None:
        check_image(self.image)
        _check(bool(_DNS1123.match(self.namespace)) and len(self.namespace) <= 63,
               "launch.namespace", "a DNS-1123 label (a-z, 0-9, '-', <= 63 chars)",
               self.namespace)
        _check(bool(_DNS1035.match(self.name_prefix)) and len(self.name_prefix) <= 39,
               "launch.name_prefix", "a DNS-1035 label of <= 39 chars (a-z first)",
               self.name_prefix)
        _check(1 <= self.nodes <= 1000, "launch.nodes", "1..1000", self.nodes)
        _check(1 <= self.nproc_per_node <= 64, "launch.nproc_per_node", "1..64",
               self.nproc_per_node)
        for name in ("cpu", "memory", "shm_size"):
            value = getattr(self, name)
            _check(bool(_QUANTITY.match(value)), f"launch.{name}",
                   "a Kubernetes quantity (e.g. 2, 500m, 4Gi)", value)
        for name in ("cpu_limit", "memory_limit"):
            value = getattr(self, name)
            _check(value == "" or bool(_QUANTITY.match(value)), f"launch.{name}",
                   "'' (= the request) or a Kubernetes quantity", value)
        _check(0 <= self.gpus <= 64, "launch.gpus", "0..64", self.gpus)
        _check(bool(_DNS1123.match(self.volume_claim)), "launch.volume_claim",
               "a PVC name (DNS-1123)", self.volume_claim)
        _check(self.mount_path.startswith("/") and self.mount_path != "/",
               "launch.mount_path", "an absolute path other than /", self.mount_path)
        _check(1 <= self.port <= 65535, "launch.port", "1..65535", self.port)
        _check(self.backoff_limit >= 0, "launch.backoff_limit", "an int >= 0",
               self.backoff_limit)
        _check(self.active_deadline_s >= 1, "launch.active_deadline_s", "an int >= 1 second",
               self.active_deadline_s)
        _check(self.ttl_after_finished_s >= 0, "launch.ttl_after_finished_s", "an int >= 0",
               self.ttl_after_finished_s)
        lo, hi = self.elastic_min_nodes, self.elastic_max_nodes
        _check((lo == 0) == (hi == 0), "launch.elastic_min_nodes/elastic_max_nodes",
               "both 0 (not elastic) or both >= 1", [lo, hi])
        _check(lo <= hi, "launch.elastic_min_nodes", f"<= launch.elastic_max_nodes ({hi})", lo)
        _check(not self.elastic or lo <= self.nodes <= hi, "launch.nodes",
               f"within [elastic_min_nodes, elastic_max_nodes] = [{lo}, {hi}]", self.nodes)
        _check(not (self.elastic and self.launcher == "python"), "launch.launcher",
               "'auto' or 'torchrun' for an elastic job (only torchrun reads PET_*)",
               self.launcher)
        _check(bool(_DNS1123.match(self.runtime)) and len(self.runtime) <= 253,
               "launch.runtime", "a ClusterTrainingRuntime name (DNS-1123)", self.runtime)
        _check(not (self.kind == "trainjob" and self.elastic), "launch.elastic_min_nodes",
               "0 with launch.kind=trainjob (Trainer v2 has no elastic policy)",
               self.elastic_min_nodes)
        _check(not (self.kind == "trainjob" and self.launcher == "python"
                    and self.nodes * self.nproc_per_node > 1), "launch.launcher",
               "'auto' or 'torchrun' for a TrainJob of more than one process (the Trainer "
               "sets only PET_*, which only torchrun reads)", self.launcher)
        _check(self.max_restarts >= 0, "launch.max_restarts", "an int >= 0", self.max_restarts)
        for name in ("env", "node_selector", "local_mounts"):
            for item in getattr(self, name):
                _check("=" in item and bool(item.split("=", 1)[0]), f"launch.{name}",
                       "KEY=VALUE items", item)

    @property
    def elastic(self) -> bool:
        return self.elastic_max_nodes > 0

    @property
    def uses_torchrun(self) -> bool:
        if self.launcher == "auto" and self.kind == "trainjob":
            return True  # the Trainer's torch plugin sets PET_* only (no RANK, WORLD_SIZE)
        if self.launcher == "auto":
            return self.nproc_per_node > 1 or self.elastic
        return self.launcher == "torchrun"
