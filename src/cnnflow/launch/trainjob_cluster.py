"""What differs when `cnnflow.launch.kubernetes.launch_job` runs a TrainJob (Kubeflow
Trainer v2, trainer.kubeflow.org/v1alpha1) instead of a PyTorchJob.

- Before anything is created, the runtime the job references must exist:
  GET clustertrainingruntimes/NAME (or trainingruntimes/NAME in the job's namespace for
  runtimeRef.kind TrainingRuntime); a 404 is one line naming launch.runtime and the
  runtimes the cluster has.
- The Trainer runs the job as a JobSet; the pods of its trainer step are labelled
  `jobset.sigs.k8s.io/jobset-name=<job>`, `trainer.kubeflow.org/trainjob-ancestor-step=
  trainer` and `batch.kubernetes.io/job-completion-index=<node rank>`, named
  `<job>-node-0-<rank>-<suffix>`, container `node`. Node 0's log is followed.
- The job ends with a True `Complete` or `Failed` condition (metav1.Condition); reason
  `DeadlineExceeded` when spec.activeDeadlineSeconds stopped it.

Why the Kubernetes API and not the `kubeflow` SDK's TrainerClient: TrainerClient.train
builds the TrainJob from a Python function or a built-in trainer, while cnnflow's pods
run one command (`torchrun -m cnnflow.train --params FILE`) with a params ConfigMap,
volumes and security settings that only runtimePatches carry; and its watch/log
helpers would be a second code path beside the one the PyTorchJob already uses. So
the TrainJob goes through CustomObjectsApi like the PyTorchJob, and only the models
(kubeflow-trainer-api) come from Kubeflow.

Progress in TrainJob status (status.trainerStatus, `update_trainjob_status`) is not
reported: it needs the controller's TrainJobStatus feature gate and credentials the
Trainer injects into the pod, which nothing here can exercise.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

from cnnflow.launch.kubernetes import JobKind, LaunchError, _api_error
from cnnflow.launch.trainjob import (
    ANCESTOR_LABEL,
    GROUP,
    INDEX_LABEL,
    JOBSET_LABEL,
    KIND,
    NODE,
    PLURAL,
    RUNTIME_KIND,
    RUNTIME_PLURAL,
    TRAINER_STEP,
    VERSION,
)

TRAINJOB = JobKind(
    KIND, GROUP, VERSION, PLURAL, "Complete", NODE, "node-0", "node-0",
    lambda name: f"{JOBSET_LABEL}={name},{ANCESTOR_LABEL}={TRAINER_STEP},{INDEX_LABEL}=0",
    "spec.activeDeadlineSeconds", lambda spec: spec.get("activeDeadlineSeconds"),
    "Kubeflow Trainer v2 (its controller and JobSet)", "manifests/overlays/trainer-v2")


def check_runtime(custom: client.CustomObjectsApi, job: dict[str, Any], namespace: str,
                  host: str) -> dict[str, Any]:
    """The runtime `job` references, read from the cluster; LaunchError when it has none
    of that name (naming the ones it has) or cannot be asked."""
    ref = (job.get("spec") or {}).get("runtimeRef") or {}
    name, kind = ref.get("name", ""), ref.get("kind") or RUNTIME_KIND
    namespaced = kind == "TrainingRuntime"
    plural = "trainingruntimes" if namespaced else RUNTIME_PLURAL
    what = f"reading {kind} {name}"
    try:
        if namespaced:
            return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural,
                                                       name, _request_timeout=30)
        return custom.get_cluster_custom_object(GROUP, VERSION, plural, name,
                                                _request_timeout=30)
    except ApiException as exc:
        if exc.status != 404:
            raise _api_error(exc, what, host, TRAINJOB) from None
    except HTTPError as exc:
        raise LaunchError(f"{what}: cannot reach the API server at {host}: "
                          f"{type(exc).__name__}") from None
    try:
        items = (custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural,
                                                      _request_timeout=30) if namespaced
                 else custom.list_cluster_custom_object(GROUP, VERSION, plural,
                                                        _request_timeout=30))["items"]
    except ApiException as exc:
        if exc.status == 404:  # the list 404s too: no such resource, no Trainer
            raise LaunchError(f"{what}: {GROUP}/{VERSION} {plural} is not served by {host}: "
                              f"install {TRAINJOB.controller}") from None
        raise _api_error(exc, f"listing {plural}", host, TRAINJOB) from None
    installed = ", ".join(sorted(i["metadata"]["name"] for i in items)) or "none"
    raise LaunchError(f"launch.runtime {name!r} not found on the cluster; installed: "
                      f"{installed}")
