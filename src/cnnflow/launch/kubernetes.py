"""Run a rendered PyTorchJob or TrainJob on a cluster: create, follow, report, clean up.

    api = api_client()                          # kubeconfig, or in-cluster credentials
    outcome = launch_job(render_job(cfg, run_id=rid, params_yaml=text), api=api)

1. Validate every document (operator rules, schemas), then create the PyTorchJob through
   CustomObjectsApi, then its ConfigMap(s) with an ownerReference to the job, so the
   cluster's garbage collector removes them with it. If a later creation fails, what was
   already created is deleted before the error is raised: nothing is left half-created.
2. Watch the job (field selector on its name, resourceVersion from the creation) until a
   `Succeeded` or `Failed` condition is True, while a thread follows the Master pod's
   log (labels training.kubeflow.org/job-name and replica-type=master, container
   `pytorch`) into `sink`, prefixed `[master-0]`, once per container start.
3. A `Failed` job raises `LaunchError` with the condition's message. A job the operator
   stops at runPolicy.activeDeadlineSeconds (reason DeadlineExceeded), or that shows
   no outcome `deadline_grace_s` after that deadline (no operator, never scheduled),
   raises an error naming activeDeadlineSeconds and, when known, why the master pod
   was not scheduled.
4. Unless `keep`, the job (and its ConfigMaps) is deleted at the end, success or not.

A TrainJob (trainer.kubeflow.org/v1alpha1) goes the same way with what
`cnnflow.launch.trainjob_cluster.TRAINJOB` says differs: its runtime is checked first,
it ends with a `Complete` or `Failed` condition, its deadline is
spec.activeDeadlineSeconds, and the log followed is node 0's (`[node-0]`).

The ServiceAccount running this needs: pytorchjobs (or trainjobs) create/get/list/watch/
delete; configmaps create/delete; pods get/list; pods/log get (manifests/base/rbac.yaml;
for TrainJobs also clustertrainingruntimes get/list: manifests/overlays/trainer-v2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from cnnflow.configs.launch import check_image
from cnnflow.errors import CnnflowError, ConfigError
from cnnflow.launch.pytorchjob import JOB_NAME_LABEL, REPLICA_TYPE_LABEL
from cnnflow.launch.validate import pod_specs, validate_documents

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
log = logging.getLogger("cnnflow")


@dataclass(frozen=True)
class JobKind:
    """What the launcher needs to know about one kind of training job."""

    kind: str
    group: str
    version: str
    plural: str
    success: str  # the condition type that means it succeeded
    container: str  # the training container
    log_label: str  # the followed pod, as log lines are prefixed
    pod_role: str  # the followed pod, in messages
    pod_selector: Callable[[str], str]  # job name -> label selector of that pod
    deadline_field: str  # where the deadline is, in messages
    deadline: Callable[[dict[str, Any]], int | None]  # spec -> seconds
    controller: str  # who runs the job, in messages
    rbac: str  # the manifest with the launcher's Role


PYTORCHJOB = JobKind(
    "PyTorchJob", GROUP, VERSION, PLURAL, "Succeeded", "pytorch", "master-0", "master",
    lambda name: f"{JOB_NAME_LABEL}={name},{REPLICA_TYPE_LABEL}=master",
    "runPolicy.activeDeadlineSeconds",
    lambda spec: (spec.get("runPolicy") or {}).get("activeDeadlineSeconds"),
    "the Kubeflow training operator", "manifests/base/rbac.yaml")


class LaunchError(CnnflowError):
    """The cluster refused, failed or never ran the job; the message says which and why."""


def api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """An API client from `kubeconfig` (or $KUBECONFIG, ~/.kube/config), or in-cluster."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except ConfigException as exc:
            raise LaunchError(f"in-cluster credentials: {exc}") from None
    path = kubeconfig or (os.environ.get("KUBECONFIG") or "").split(os.pathsep)[0] or str(
        Path.home() / ".kube" / "config")
    if not Path(path).expanduser().is_file():
        raise LaunchError(f"kubeconfig {path}: not found; set KUBECONFIG or pass the file "
                          "(or run inside the cluster)")
    try:
        return config.new_client_from_config(config_file=str(Path(path).expanduser()),
                                             context=context)
    except ConfigException as exc:
        raise LaunchError(f"kubeconfig {path}: {str(exc).splitlines()[0]}") from None


@dataclass
class JobOutcome:
    name: str
    namespace: str
    succeeded: bool
    reason: str
    message: str
    log_lines: int = 0
    conditions: list[dict[str, Any]] = field(default_factory=list)


def _api_error(exc: ApiException, what: str, host: str,
               kind: JobKind = PYTORCHJOB) -> LaunchError:
    message = exc.reason or ""
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(exc.body or "{}").get("message") or message
    if exc.status == 404 and what.startswith(f"creating {kind.kind}"):
        return LaunchError(f"{what}: {kind.group}/{kind.version} {kind.plural} is not served "
                           f"by {host}: install {kind.controller} (or check the namespace)")
    if exc.status == 403:
        return LaunchError(f"{what}: forbidden ({message}); the service account needs the "
                           f"Role in {kind.rbac}")
    return LaunchError(f"{what}: HTTP {exc.status}: {message}")


def _terminal(job: dict[str, Any], success: str = "Succeeded") -> dict[str, Any] | None:
    """The True Succeeded (`success`)/Failed condition of a job, if it has finished."""
    for cond in reversed((job.get("status") or {}).get("conditions") or []):
        if cond.get("type") in (success, "Failed") and cond.get("status") == "True":
            return cond
    return None


class _MasterLog(threading.Thread):
    """Follow the master (node 0) pod's training container log, once per container start."""

    def __init__(self, core: client.CoreV1Api, namespace: str, name: str,
                 sink: Callable[[str], None], poll_s: float,
                 kind: JobKind = PYTORCHJOB) -> None:
        super().__init__(daemon=True, name=f"log-{name}")
        self.kind = kind
        self.core, self.namespace, self.name, self.sink = core, namespace, name, sink
        self.poll_s = poll_s
        self.stop = threading.Event()
        self.lines = 0
        self.pending_reason = ""
        self.scheduled = False
        self._seen: set[tuple[str, int]] = set()

    def run(self) -> None:
        selector = self.kind.pod_selector(self.name)
        while not self.stop.is_set():
            try:
                pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector,
                                                     _request_timeout=30).items
                for pod in pods:
                    self._follow(pod)
            except (ApiException, HTTPError) as exc:
                log.debug("master log of %s: %s", self.name, exc)
            self.stop.wait(self.poll_s)

    def _follow(self, pod: Any) -> None:
        status = pod.status
        for cond in (status.conditions or []) if status else []:
            if cond.type == "PodScheduled":
                self.scheduled = cond.status == "True"
                if cond.status != "True":
                    self.pending_reason = f"{cond.reason}: {cond.message}"
        statuses = [c for c in (status.container_statuses or [])
                    if c.name == self.kind.container]
        started = statuses and statuses[0].state and not statuses[0].state.waiting
        if not started:
            return
        key = (pod.metadata.uid or pod.metadata.name, statuses[0].restart_count or 0)
        if key in self._seen:
            return
        self._seen.add(key)
        stream = watch.Watch().stream(self.core.read_namespaced_pod_log, pod.metadata.name,
                                      self.namespace, container=self.kind.container,
                                      follow=True)
        for line in stream:
            self.sink(f"[{self.kind.log_label}] {line}")
            self.lines += 1


class _Launcher:
    def __init__(self, api: client.ApiClient, docs: Sequence[dict[str, Any]], *,
                 sink: Callable[[str], None], poll_s: float, watch_s: int,
                 deadline_grace_s: float, kind: JobKind = PYTORCHJOB) -> None:
        self.kind = k = kind
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.host = api.configuration.host
        self.sink, self.poll_s, self.watch_s = sink, poll_s, watch_s
        self.deadline_grace_s = deadline_grace_s
        jobs = [d for d in docs if d.get("kind") == k.kind]
        if len(jobs) != 1:
            raise LaunchError(f"expected exactly one {k.kind}, found {len(jobs)}")
        self.job = jobs[0]
        self.others = [d for d in docs if d is not self.job]
        unsupported = [d.get("kind") for d in self.others if d.get("kind") != "ConfigMap"]
        if unsupported:
            raise LaunchError(f"only ConfigMaps can accompany the job, got {unsupported}")
        self.name = self.job["metadata"]["name"]
        self.namespace = self.job["metadata"].get("namespace") or "default"
        self.created_maps: list[str] = []
        self.job_created = False

    # ------------------------------------------------------------- create / delete

    def create(self) -> dict[str, Any]:
        k = self.kind
        what = f"creating {k.kind} {self.namespace}/{self.name}"
        try:
            created = self.custom.create_namespaced_custom_object(
                k.group, k.version, self.namespace, k.plural, self.job, _request_timeout=30)
        except ApiException as exc:
            raise _api_error(exc, what, self.host, k) from None
        except HTTPError as exc:
            raise LaunchError(f"{what}: cannot reach the API server at {self.host}: "
                              f"{type(exc).__name__}") from None
        self.job_created = True
        owner = {"apiVersion": f"{k.group}/{k.version}", "kind": k.kind, "name": self.name,
                 "uid": created["metadata"]["uid"], "blockOwnerDeletion": False}
        for doc in self.others:
            doc = {**doc, "metadata": {**doc["metadata"], "namespace": self.namespace,
                                       "ownerReferences": [owner]}}
            name = doc["metadata"]["name"]
            try:
                self.core.create_namespaced_config_map(self.namespace, doc, _request_timeout=30)
            except (ApiException, HTTPError) as exc:
                err = (_api_error(exc, f"creating ConfigMap {self.namespace}/{name}", self.host,
                                  k) if isinstance(exc, ApiException) else exc)
                self.delete()
                raise LaunchError(f"{err}; deleted the {k.kind} {self.name} created "
                                  "before it") from None
            self.created_maps.append(name)
        return created

    def delete(self) -> None:
        """Delete what this launcher created (a missing object is fine)."""
        for name in self.created_maps:
            try:
                self.core.delete_namespaced_config_map(name, self.namespace, _request_timeout=30)
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("could not delete ConfigMap %s: HTTP %s", name, exc.status)
        self.created_maps = []
        if self.job_created:
            try:
                k = self.kind
                self.custom.delete_namespaced_custom_object(
                    k.group, k.version, self.namespace, k.plural, self.name,
                    propagation_policy="Background", _request_timeout=30)
                log.info("deleted %s %s/%s", k.kind, self.namespace, self.name)
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("could not delete %s %s: HTTP %s", self.kind.kind, self.name,
                                exc.status)
            self.job_created = False

    # ------------------------------------------------------------------ waiting

    def wait(self, created: dict[str, Any]) -> JobOutcome:
        k = self.kind
        deadline = k.deadline(self.job.get("spec") or {})
        give_up = time.monotonic() + (deadline + self.deadline_grace_s if deadline else 1e12)
        follower = _MasterLog(self.core, self.namespace, self.name, self.sink, self.poll_s,
                              k)
        follower.start()
        try:
            job = self._watch_until_done(created, give_up)
        finally:
            follower.stop.set()
        follower.join(timeout=10)  # the log stream ends when the container does
        cond = _terminal(job, k.success) if job else None
        if cond is None:
            raise LaunchError(self._deadline_message(deadline, follower, "shows no outcome"))
        outcome = JobOutcome(self.name, self.namespace, cond["type"] == k.success,
                             cond.get("reason") or "", cond.get("message") or "",
                             follower.lines, (job.get("status") or {}).get("conditions") or [])
        if outcome.succeeded:
            return outcome
        if outcome.reason == "DeadlineExceeded":
            raise LaunchError(self._deadline_message(deadline, follower, "was stopped"))
        raise LaunchError(f"{k.kind} {self.namespace}/{self.name} failed: "
                          f"{outcome.message or outcome.reason}")

    def _deadline_message(self, deadline: int | None, follower: _MasterLog, what: str) -> str:
        k = self.kind
        text = (f"{k.kind} {self.namespace}/{self.name} {what} after "
                f"{k.deadline_field}={deadline}")
        if follower.pending_reason and not follower.scheduled:
            text += f": its {k.pod_role} pod was never scheduled ({follower.pending_reason})"
        elif not follower.scheduled:
            text += (f": no {k.pod_role} pod was ever scheduled (is {k.controller} running, "
                     "and do the resource requests fit a node?)")
        return text

    def _watch_until_done(self, job: dict[str, Any], give_up: float) -> dict[str, Any] | None:
        k = self.kind
        version = job["metadata"].get("resourceVersion")
        while time.monotonic() < give_up:
            if _terminal(job, k.success):
                return job
            remaining = max(1, int(min(self.watch_s, give_up - time.monotonic()) + 0.999))
            try:
                for event in watch.Watch().stream(
                        self.custom.list_namespaced_custom_object, k.group, k.version,
                        self.namespace, k.plural, field_selector=f"metadata.name={self.name}",
                        resource_version=version, timeout_seconds=remaining,
                        _request_timeout=remaining + 10):
                    obj = event["object"]
                    version = obj["metadata"].get("resourceVersion", version)
                    if _terminal(obj, k.success):  # also a DELETED event's last state (TTL)
                        return obj
                    if event["type"] == "DELETED":
                        raise LaunchError(f"{k.kind} {self.namespace}/{self.name} was "
                                          "deleted while it ran")
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: our resourceVersion expired; re-read
                    raise _api_error(exc, f"watching {k.kind} {self.name}", self.host,
                                     k) from None
            except HTTPError as exc:
                log.debug("watch of %s interrupted: %s", self.name, exc)
            try:
                job = self.custom.get_namespaced_custom_object(
                    k.group, k.version, self.namespace, k.plural, self.name,
                    _request_timeout=30)
            except ApiException as exc:
                if exc.status == 404:
                    raise LaunchError(f"{k.kind} {self.namespace}/{self.name} was deleted "
                                      "while it ran") from None
                raise _api_error(exc, f"reading {k.kind} {self.name}", self.host, k) from None
            version = job["metadata"].get("resourceVersion")
        return job if _terminal(job, k.success) else None


def launch_job(rendered: Any, *, api: client.ApiClient, keep: bool = False,
               sink: Callable[[str], None] | None = None, poll_s: float = 2.0,
               watch_s: int = 60, deadline_grace_s: float = 60.0) -> JobOutcome:
    """Create the job (and its ConfigMaps), follow it to the end, clean up; see the module
    docstring. `rendered` is a `RenderedJob`, `RenderedTrainJob` or a list of manifest
    dicts (one PyTorchJob or TrainJob, plus ConfigMaps). Raises
    `LaunchError` unless the job succeeded."""
    docs = rendered.documents() if hasattr(rendered, "documents") else list(rendered)
    validate_documents(docs, security=False)
    kind = PYTORCHJOB
    if any(d.get("kind") == "TrainJob" for d in docs):
        from cnnflow.launch.trainjob_cluster import TRAINJOB, check_runtime

        kind = TRAINJOB
    for doc in docs:  # an untagged image means :latest, which can change under the job
        for where, spec in pod_specs(doc):
            for c in spec.get("containers", []):
                if doc.get("kind") == "TrainJob" and "image" not in c:
                    continue  # the runtime's image, which the launcher does not see
                try:
                    check_image(c.get("image", ""), f"{where} container {c.get('name')} image")
                except ConfigError as exc:
                    raise LaunchError(str(exc)) from None
    launcher = _Launcher(api, docs, sink=sink or (lambda line: log.info("%s", line)),
                         poll_s=poll_s, watch_s=watch_s, deadline_grace_s=deadline_grace_s,
                         kind=kind)
    if kind is not PYTORCHJOB:
        check_runtime(launcher.custom, launcher.job, launcher.namespace, launcher.host)
    created = launcher.create()
    log.info("created %s %s/%s", kind.kind, launcher.namespace, launcher.name)
    try:
        outcome = launcher.wait(created)
        log.info("%s %s/%s succeeded", kind.kind, launcher.namespace, launcher.name)
        return outcome
    finally:
        if keep:
            log.info("keeping %s %s/%s (launch.keep_job)", kind.kind, launcher.namespace,
                     launcher.name)
        else:
            launcher.delete()
