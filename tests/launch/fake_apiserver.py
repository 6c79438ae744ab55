"""An in-process fake of the Kubernetes API server, for the endpoints the launcher uses.
It stands in for the Kubernetes API (and for the Kubeflow controllers a test plays):
no cluster, no training operator, no Trainer.

It speaks the JSON the real API server returns (objects with uid and resourceVersion,
`Status` bodies on errors, watch streams of `{"type", "object"}` lines and followed pod
logs sent with chunked transfer encoding), so tests drive the real `kubernetes` client
configured with `Configuration(host=cluster.url)`. Endpoints:

    POST/GET(list, watch)   /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs
    GET/DELETE              /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}
    POST/GET(list, watch)   /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs
    GET/DELETE              /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs/{name}
    GET(list)/GET           /apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes[/{name}]
    POST                    /api/v1/namespaces/{ns}/configmaps
    GET/DELETE              /api/v1/namespaces/{ns}/configmaps/{name}
    GET(list)               /api/v1/namespaces/{ns}/pods?labelSelector=...
    GET(follow)             /api/v1/namespaces/{ns}/pods/{name}/log

There is no operator: a test passes `on_create(cluster, job)`, run in a thread when a
PyTorchJob or TrainJob is created, which plays one (add pods, write log lines, set
conditions): `add_pod` makes a pod as the training operator names and labels it,
`add_node_pod` one as Trainer v2 makes them through a JobSet (`<job>-node-0-<i>-<5
chars>`, labels jobset.sigs.k8s.io/jobset-name, batch.kubernetes.io/job-completion-index,
trainer.kubeflow.org/trainjob-ancestor-step). `runtimes` names the
ClusterTrainingRuntimes the cluster has (default: torch-distributed). It
orders its steps on what the launcher does, not on time: `wait_for_request` blocks until
the launcher has sent a given request (e.g. started following the master pod's log).
An exception in `on_create` fails the job (reason `ScenarioError`, the exception as its
message), so the launcher stops at once and the test shows why.
`fail_create={"ConfigMap": 403}` makes creating that kind fail; `no_crd=True` answers
404 for pytorchjobs, trainjobs and runtimes, as a cluster without the operator does.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?$")
TRAINJOBS = re.compile(
    r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
RUNTIMES = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/clustertrainingruntimes"
                      r"(?:/([^/]+))?$")
ROUTES = ((JOBS, "PyTorchJob"), (TRAINJOBS, "TrainJob"))


def job_route(path: str) -> tuple[re.Match | None, str]:
    for pattern, kind in ROUTES:
        if mt := pattern.match(path):
            return mt, kind
    return None, ""
MAPS = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOGS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeCluster:
    """State (objects, events, pod logs) plus the HTTP server in a thread."""

    def __init__(self, on_create: Callable[[FakeCluster, dict], None] | None = None, *,
                 fail_create: dict[str, int] | None = None, no_crd: bool = False,
                 runtimes: tuple[str, ...] = ("torch-distributed",)) -> None:
        self.on_create = on_create
        self.fail_create = fail_create or {}
        self.no_crd = no_crd
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # rv, kind, type, obj
        self.logs: dict[str, list[str]] = {}
        self.logs_done: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path[?watch|?follow])
        self.rv = 100
        self.cond = threading.Condition()
        self.stopping = False
        self.threads: list[threading.Thread] = []
        handler = type("Handler", (_Handler,), {"cluster": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        for name in () if no_crd else runtimes:
            self.create("ClusterTrainingRuntime", "", {
                "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
                "metadata": {"name": name}, "spec": {"mlPolicy": {"torch": {}}}})

    def __enter__(self) -> FakeCluster:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()
        for t in self.threads:
            t.join(timeout=5)

    # ---------------------------------------------------------------- state

    def _store(self, kind: str, obj: dict[str, Any], event: str) -> dict[str, Any]:
        with self.cond:
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            key = (kind, obj["metadata"]["namespace"], obj["metadata"]["name"])
            if event == "DELETED":
                self.objects.pop(key, None)
            else:
                self.objects[key] = obj
            self.events.append((self.rv, kind, event, json.loads(json.dumps(obj))))
            self.cond.notify_all()
            return obj

    def create(self, kind: str, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now())
        return self._store(kind, obj, "ADDED")

    def get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((kind, ns, name))
            return json.loads(json.dumps(obj)) if obj else None

    def names(self, kind: str) -> list[str]:
        with self.cond:
            return sorted(k[2] for k in self.objects if k[0] == kind)

    def set_condition(self, job: dict[str, Any], ctype: str, reason: str,
                      message: str) -> None:
        """Append a True condition (and mark earlier ones False) like the operator does."""
        ns, name, kind = job["metadata"]["namespace"], job["metadata"]["name"], job["kind"]
        obj = self.get(kind, ns, name)
        if obj is None:
            return
        status = obj.setdefault("status", {})
        conds = status.setdefault("conditions", [])
        for c in conds:
            if c["type"] in ("Running", "Created", "Restarting") and ctype != "Created":
                c["status"] = "False"
        conds.append({"type": ctype, "status": "True", "reason": reason, "message": message,
                      "lastUpdateTime": now(), "lastTransitionTime": now()})
        if ctype in ("Succeeded", "Complete", "Failed"):
            status["completionTime"] = now()
        self._store(kind, obj, "MODIFIED")

    def add_pod(self, job: dict[str, Any], rtype: str, index: int, phase: str, *,
                scheduled: tuple[str, str] | None = None, restarts: int = 0) -> str:
        """A pod of the job, labelled as the operator labels it; returns its name."""
        ns, jname = job["metadata"]["namespace"], job["metadata"]["name"]
        name = f"{jname}-{rtype}-{index}"
        running = phase in ("Running", "Succeeded", "Failed")
        state = ({"running": {"startedAt": now()}} if running
                 else {"waiting": {"reason": "ContainerCreating"}})
        conditions = [{"type": "PodScheduled", "status": "True"}]
        if scheduled is not None:
            conditions = [{"type": "PodScheduled", "status": "False", "reason": scheduled[0],
                           "message": scheduled[1]}]
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {
                "training.kubeflow.org/job-name": jname,
                "training.kubeflow.org/replica-type": rtype,
                "training.kubeflow.org/replica-index": str(index)}},
            "spec": {"containers": [{"name": "pytorch", "image": "cnnflow:0.1.0"}]},
            "status": {"phase": phase, "conditions": conditions, "containerStatuses": [{
                "name": "pytorch", "image": "cnnflow:0.1.0", "imageID": "", "ready": running,
                "restartCount": restarts, "state": state}]},
        }
        existing = self.get("Pod", ns, name)
        if existing:
            pod["metadata"]["uid"] = existing["metadata"]["uid"]
            self._store("Pod", pod, "MODIFIED")
        else:
            self.create("Pod", ns, pod)
        return name

    def add_node_pod(self, job: dict[str, Any], index: int, phase: str, *,
                     scheduled: tuple[str, str] | None = None) -> str:
        """Node `index` of a TrainJob, named and labelled as JobSet makes it; its name."""
        ns, jname = job["metadata"]["namespace"], job["metadata"]["name"]
        prefix = f"{jname}-node-0-{index}-"
        existing = next((o for (k, n, name), o in list(self.objects.items())
                         if k == "Pod" and n == ns and name.startswith(prefix)), None)
        name = existing["metadata"]["name"] if existing else prefix + uuid.uuid4().hex[:5]
        running = phase in ("Running", "Succeeded", "Failed")
        state = ({"running": {"startedAt": now()}} if running
                 else {"waiting": {"reason": "ContainerCreating"}})
        conditions = [{"type": "PodScheduled", "status": "True"}]
        if scheduled is not None:
            conditions = [{"type": "PodScheduled", "status": "False", "reason": scheduled[0],
                           "message": scheduled[1]}]
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {
                "jobset.sigs.k8s.io/jobset-name": jname,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "jobset.sigs.k8s.io/job-index": "0",
                "batch.kubernetes.io/job-completion-index": str(index),
                "batch.kubernetes.io/job-name": f"{jname}-node-0",
                "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"},
                "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"containers": [{"name": "node", "image": "cnnflow:0.1.0"}]},
            "status": {"phase": phase, "conditions": conditions, "containerStatuses": [{
                "name": "node", "image": "cnnflow:0.1.0", "imageID": "", "ready": running,
                "restartCount": 0, "state": state}]},
        }
        if existing:
            pod["metadata"]["uid"] = existing["metadata"]["uid"]
            self._store("Pod", pod, "MODIFIED")
        else:
            self.create("Pod", ns, pod)
        return name

    def write_log(self, pod: str, *lines: str, done: bool = False) -> None:
        with self.cond:
            self.logs.setdefault(pod, []).extend(lines)
            if done:
                self.logs_done.add(pod)
            self.cond.notify_all()

    # ---------------------------------------------------------------- requests

    def seen(self, method: str, path: str) -> None:
        """Record a request as it arrives (before it is answered) and wake the waiters."""
        with self.cond:
            self.requests.append((method, path))
            self.cond.notify_all()

    def wait_for_request(self, method: str, path: str, *, after: int = 0,
                         timeout: float = 30) -> int:
        """Block until `(method, path)` is among the requests from index `after` on; its
        index. Logs are recorded as `.../log?follow` when followed, watches as `...?watch`.
        `timeout` only guards against a hang: it raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.requests)):
                    if self.requests[i] == (method, path):
                        return i
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping:
                    raise TimeoutError(f"no {method} {path} after request #{after} within "
                                       f"{timeout:g} s; seen: {self.requests[after:]}")
                self.cond.wait(left)

    def request_count(self) -> int:
        with self.cond:
            return len(self.requests)

    # ---------------------------------------------------------------- HTTP side

    def after_create(self, job: dict[str, Any]) -> None:
        if self.on_create is not None:
            t = threading.Thread(target=self._scenario, args=(job,), daemon=True)
            self.threads.append(t)
            t.start()

    def _scenario(self, job: dict[str, Any]) -> None:
        try:
            self.on_create(self, job)
        except Exception as exc:  # reported through the job: see the module docstring
            self.set_condition(job, "Failed", "ScenarioError",
                               f"scenario {self.on_create.__name__}: {exc!r}")


class _Handler(BaseHTTPRequestHandler):
    cluster: FakeCluster
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # -- responses
    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._json(code, status_body(code, reason, message))

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    # -- verbs
    def do_POST(self) -> None:
        c, url = self.cluster, urlparse(self.path)
        c.seen("POST", url.path)
        body = self._body()
        mt, kind = job_route(url.path)
        if mt:
            if c.no_crd:
                return self._status(404, "NotFound", "the server could not find the "
                                    "requested resource")
        elif mt := MAPS.match(url.path):
            kind = "ConfigMap"
        else:
            return self._status(404, "NotFound", f"no route {url.path}")
        ns = mt.group(1)
        if kind in c.fail_create:
            code = c.fail_create[kind]
            return self._status(code, "Forbidden" if code == 403 else "Invalid",
                                f'{kind.lower()}s is forbidden: User "system:serviceaccount:'
                                f'{ns}:pipeline" cannot create resource')
        if c.get(kind, ns, body["metadata"]["name"]):
            return self._status(409, "AlreadyExists", f'{kind} "{body["metadata"]["name"]}" '
                                "already exists")
        obj = c.create(kind, ns, body)
        self._json(201, obj)
        if kind != "ConfigMap":
            c.after_create(obj)

    def do_DELETE(self) -> None:
        c, url = self.cluster, urlparse(self.path)
        c.seen("DELETE", url.path)
        for pattern, kind in (*ROUTES, (MAPS, "ConfigMap")):
            mt = pattern.match(url.path)
            if mt and mt.group(2):
                obj = c.get(kind, mt.group(1), mt.group(2))
                if obj is None:
                    return self._status(404, "NotFound", f'{kind} "{mt.group(2)}" not found')
                c._store(kind, obj, "DELETED")
                return self._json(200, {"kind": "Status", "apiVersion": "v1",
                                        "status": "Success", "metadata": {}})
        self._status(404, "NotFound", f"no route {url.path}")

    def do_GET(self) -> None:
        c, url = self.cluster, urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        watching = str(q.get("watch")).lower() == "true"
        following = str(q.get("follow")).lower() == "true"
        c.seen("GET", url.path + ("?watch" if watching else "?follow" if following else ""))
        mt, kind = job_route(url.path)
        if (mt or RUNTIMES.match(url.path)) and c.no_crd:
            return self._status(404, "NotFound", "the server could not find the resource")
        if mt and mt.group(2):
            obj = c.get(kind, mt.group(1), mt.group(2))
            return (self._json(200, obj) if obj else self._status(
                404, "NotFound", f'{kind.lower()}s.kubeflow.org "{mt.group(2)}" not found'))
        if mt and watching:
            return self._watch(kind, mt.group(1), q)
        if rt := RUNTIMES.match(url.path):
            return self._runtimes(rt.group(1))
        if mt := MAPS.match(url.path):
            obj = c.get("ConfigMap", mt.group(1), mt.group(2) or "")
            return (self._json(200, obj) if obj else
                    self._status(404, "NotFound", "configmap not found"))
        if mt := PODS.match(url.path):
            return self._pods(mt.group(1), q.get("labelSelector", ""))
        if mt := LOGS.match(url.path):
            return self._log(mt.group(2), following)
        self._status(404, "NotFound", f"no route {url.path}")

    def _pods(self, ns: str, selector: str) -> None:
        want = dict(p.split("=", 1) for p in selector.split(",") if "=" in p)
        with self.cluster.cond:
            pods = [json.loads(json.dumps(o)) for (k, n, _), o in self.cluster.objects.items()
                    if k == "Pod" and n == ns and all(
                        o["metadata"]["labels"].get(a) == b for a, b in want.items())]
            rv = str(self.cluster.rv)
        self._json(200, {"apiVersion": "v1", "kind": "PodList",
                         "metadata": {"resourceVersion": rv}, "items": pods})

    def _runtimes(self, name: str | None) -> None:
        c = self.cluster
        if name:
            obj = c.get("ClusterTrainingRuntime", "", name)
            return (self._json(200, obj) if obj else self._status(
                404, "NotFound", f'clustertrainingruntimes.trainer.kubeflow.org "{name}" '
                "not found"))
        items = [c.get("ClusterTrainingRuntime", "", n) for n in c.names("ClusterTrainingRuntime")]
        self._json(200, {"apiVersion": "trainer.kubeflow.org/v1alpha1",
                         "kind": "ClusterTrainingRuntimeList",
                         "metadata": {"resourceVersion": str(c.rv)}, "items": items})

    def _watch(self, kind: str, ns: str, q: dict[str, str]) -> None:
        c = self.cluster
        name = q.get("fieldSelector", "").removeprefix("metadata.name=")
        since = int(q.get("resourceVersion") or 0)
        end = time.monotonic() + float(q.get("timeoutSeconds") or 30)
        self._start_stream("application/json")
        try:
            while True:
                with c.cond:
                    new = [(rv, t, o) for rv, k, t, o in c.events if k == kind
                           and rv > since and o["metadata"]["namespace"] == ns
                           and (not name or o["metadata"]["name"] == name)]
                    if not new:
                        if c.stopping or time.monotonic() >= end:
                            break
                        c.cond.wait(min(0.1, max(0.0, end - time.monotonic())))
                        continue
                for rv, etype, obj in new:
                    self._chunk(json.dumps({"type": etype, "object": obj}).encode() + b"\n")
                    since = rv
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _log(self, pod: str, follow: bool) -> None:
        c = self.cluster
        if not follow:
            with c.cond:
                text = "".join(line + "\n" for line in c.logs.get(pod, []))
            data = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._start_stream("text/plain")
        sent = 0
        try:
            while True:
                with c.cond:
                    lines = c.logs.get(pod, [])[sent:]
                    done = pod in c.logs_done
                    if not lines and not done and not c.stopping:
                        c.cond.wait(0.1)
                        continue
                for line in lines:
                    self._chunk(line.encode() + b"\n")
                sent += len(lines)
                if not lines and (done or c.stopping):
                    break
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
