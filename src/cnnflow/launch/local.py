"""Run a PyTorchJob spec on this machine: one process group per replica (= per pod).

    rc = run_local("job.yaml", mounts={"/workspace": "."})   # cnnflow launch job.yaml --local

The job gets the operator's defaults first (cnnflow.launch.operator: no runPolicy means
cleanPodPolicy None and no backoffLimit, Worker replicas default to 1, ...; a Master must
state replicas: 1, as the operator's webhook demands). Each replica runs
the `pytorch` container's command/args with the environment the training operator
(kubeflow.org/v1, pkg/controller.v1/pytorch/envvar.go, master.go, elastic.go) would give
its pod, except that addresses are local:
- container env (valueFrom: see operator.container_env; what cannot resolve here is
  named in one warning per replica), then PYTHONUNBUFFERED=0 and, with a Master:
  MASTER_ADDR=127.0.0.1, MASTER_PORT (a free port), PET_MASTER_ADDR/PORT, WORLD_SIZE =
  replicas x nprocPerNode, RANK = PET_NODE_RANK = replica index (master 0, worker i ->
  i + 1), PET_NPROC_PER_NODE;
- PET_NNODES = replicas, or for elastic jobs PET_NNODES=min:max, PET_RDZV_ENDPOINT
  (127.0.0.1:<free port>), PET_RDZV_BACKEND, PET_MAX_RESTARTS and PET_RDZV_ID when
  rdzvId is set (else torchrun's default id "none"). elasticPolicy.metrics (the HPA's) are
  ignored, with one warning: the Workers run as many as `replicas` says.
Without `command`, only cnnflow's image runs (its `args` are the command, as it has no
ENTRYPOINT; see operator.container_argv); another image's entrypoint is unknown here.
`python`/`python3` run as this interpreter and `torchrun` as `python -m torch.distributed.run`,
so the job runs in this environment; the image is not used.

Volumes: every string in command/args/env that starts with a mountPath is rewritten to
a local directory: PVCs (and hostPaths, which default to their own path) through
`mounts` ({mountPath or claim name: local dir}), emptyDirs to a fresh directory per
replica, configMaps to files written from the ConfigMaps in the same YAML file.

Exit semantics (the operator's): the job succeeds when the Master exits 0 (without a
Master: when every Worker has, or any one for elastic jobs); a replica's non-zero exit is
retried in place under restartPolicy OnFailure/Always, under ExitCode only for the
operator's retryable codes (130, 137, 143: SIGINT, SIGKILL, SIGTERM; 138: SIGUSR1, for
user-defined retryable errors), never under Never; runPolicy.backoffLimit caps the
restarts of the whole job and activeDeadlineSeconds its wall time. When the job fails,
the other replicas are terminated (SIGTERM, then SIGKILL after `kill_grace_s`).
SIGTERM/SIGINT to this process acts as deleting the pods: the signal goes to every
replica, whose whole process tree is SIGKILLed after the pod's
terminationGracePeriodSeconds (default 30); exit code 128 + the signal, no process left.
Difference: with restartPolicy Always a replica that exits 0 is not restarted.
Placement: `hosts` ({replica label: cnnflow.launch.hosts.Host}) runs replicas behind an
argv prefix (e.g. `ip netns exec NS`) with their pods' addresses there instead of 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnflow.launch import operator
from cnnflow.launch.hosts import Host, addr_of, check_hosts, placed_env
from cnnflow.launch.processes import recorded_signals, stop_process_trees
from cnnflow.launch.validate import ManifestError, load_documents, validate_pytorchjob
from cnnflow.launch.volumes import rewriter, volume_dirs

log = logging.getLogger("cnnflow")

# Inherited variables that would confuse the replicas' process groups.
_LAUNCH_VARS = re.compile(r"^(MASTER_ADDR|MASTER_PORT|RANK|WORLD_SIZE|LOCAL_RANK|"
                          r"LOCAL_WORLD_SIZE|GROUP_RANK|ROLE_RANK|PET_.*|TORCHELASTIC_.*)$")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Replica:
    """One pod of the job: what runs, with which environment, and its process."""

    rtype: str
    index: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    restart_policy: str
    proc: subprocess.Popen | None = None
    grace_s: float = 30.0
    """The pod's terminationGracePeriodSeconds: SIGTERM, then SIGKILL after this."""
    done: bool = False
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.rtype.lower()}-{self.index}"


@dataclass
class LocalResult:
    succeeded: bool
    exit_code: int
    reason: str
    restarts: int
    stopped: bool = False
    """Ended by SIGTERM/SIGINT to this process (exit_code 128 + the signal)."""


def _exit_code(returncode: int) -> int:
    """A container's exit code: killed by signal N -> 128 + N, as container runtimes report."""
    return 128 - returncode if returncode < 0 else returncode


def _split(source: Any) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """(PyTorchJob dict, {ConfigMap name: data}) from a path, dict, list or RenderedJob."""
    if hasattr(source, "documents"):
        docs = source.documents()
    elif isinstance(source, dict):
        docs = [source]
    elif isinstance(source, (str, Path)):
        docs = load_documents(source)
    else:
        docs = list(source)
    jobs = [d for d in docs if d.get("kind") == "PyTorchJob"]
    if len(jobs) != 1:
        raise ManifestError(f"expected exactly one PyTorchJob in the job file, found {len(jobs)}")
    maps = {d["metadata"]["name"]: dict(d.get("data") or {})
            for d in docs if d.get("kind") == "ConfigMap"}
    return jobs[0], maps


class LocalJob:
    """Plan and supervise the replicas of one PyTorchJob (see the module docstring).
    Subclasses run other kinds through the hooks below (cnnflow.launch.trainjob_local)."""

    replica_types: tuple[str, ...] = ("Master", "Worker")
    container = "pytorch"
    kind = "PyTorchJob"
    master_label = "master-0"
    """The replica whose address is MASTER_ADDR when placed on `hosts`."""

    def __init__(self, source: Any, *, mounts: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None, workdir: str | Path | None = None,
                 echo: Callable[[str], None] | None = None, kill_grace_s: float = 10.0,
                 finish_grace_s: float = 60.0, hosts: Mapping[str, Host] | None = None
                 ) -> None:
        self.hosts = dict(hosts or {})
        self.doc, self.config_maps = self._load(source)
        self.name = self.doc["metadata"]["name"]
        self.mounts = {k: str(Path(v).resolve()) for k, v in (mounts or {}).items()}
        self.extra_env = dict(env or {})
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.echo = echo or self._stderr
        self.kill_grace_s = kill_grace_s
        self.finish_grace_s = finish_grace_s
        self._lock = threading.Lock()
        spec = self.doc["spec"]
        self.backoff_limit: int | None = spec["runPolicy"].get("backoffLimit")
        self.deadline_s: int | None = spec["runPolicy"].get("activeDeadlineSeconds")
        self.elastic = spec.get("elasticPolicy")
        if (self.elastic or {}).get("metrics"):
            log.warning("%s %s: spec.elasticPolicy.metrics ignored locally (they "
                        "drive the HorizontalPodAutoscaler on a cluster): %s Worker "
                        "replicas, no autoscaling", self.kind, self.name,
                        spec["pytorchReplicaSpecs"]["Worker"]["replicas"])
        try:
            self.replicas = self._plan()
            check_hosts(self.hosts, [r.label for r in self.replicas], self.name)
        except ManifestError:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _load(self, source: Any) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
        """(the defaulted job, {ConfigMap name: data}) from the job file."""
        doc, maps = _split(source)
        validate_pytorchjob(doc)
        return operator.with_defaults(doc), maps

    def _pod_fields(self, rtype: str, index: int) -> dict[str, str]:
        return operator.pod_fields(self.doc, rtype, index)

    def _pod_env(self, rtype: str, index: int, master_port: int, rdzv_port: int) -> dict:
        return operator.pod_env(self.doc, rtype, index, master_port, rdzv_port)

    @staticmethod
    def _stderr(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def _plan(self) -> list[Replica]:
        master_port, rdzv_port = free_port(), free_port()
        base = {k: v for k, v in os.environ.items() if not _LAUNCH_VARS.match(k)}
        replicas = []
        for rtype in self.replica_types:
            rspec = self.doc["spec"]["pytorchReplicaSpecs"].get(rtype)
            if rspec is None:
                continue
            pod = rspec["template"]["spec"]
            container = next(c for c in pod["containers"] if c["name"] == self.container)
            where = f"{self.kind} {self.name}: spec.pytorchReplicaSpecs.{rtype}"
            command = operator.container_argv(container, where)
            for index in range(int(rspec["replicas"])):
                label = f"{rtype.lower()}-{index}"
                rewrite = rewriter(volume_dirs(self.name, pod, container, self.workdir / label,
                                                 self.mounts, self.config_maps))
                fields = {**self._pod_fields(rtype, index),
                          "status.podIP": addr_of(self.hosts, label)}
                values, unset = operator.container_env(container.get("env"), fields,
                                                       self.config_maps)
                if unset:
                    log.warning("%s %s: %s: env %s not set: valueFrom %s cannot be "
                                "resolved locally", self.kind, self.name, label, ", ".join(unset),
                                ", ".join(sorted(set(unset.values()))))
                env = {k: rewrite(v) for k, v in values.items()}
                env.update(placed_env(self._pod_env(rtype, index, master_port, rdzv_port),
                                      self.hosts, self.master_label))
                argv = [rewrite(a) for a in command]
                if argv[0] in ("python", "python3"):
                    argv[0] = sys.executable
                elif argv[0] == "torchrun":
                    argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
                argv[:0] = self.hosts[label].prefix if label in self.hosts else ()
                cwd = rewrite(container.get("workingDir") or str(self.workdir))
                Path(cwd).mkdir(parents=True, exist_ok=True)
                inherited = {k: v for k, v in base.items() if k not in unset}  # "not set"
                replicas.append(Replica(rtype, index, argv,
                                        {**inherited, **env, **self.extra_env},
                                        cwd, rspec["restartPolicy"], grace_s=float(
                                            pod.get("terminationGracePeriodSeconds", 30))))
        return replicas

    # ------------------------------------------------------------------ running

    def _pump(self, replica: Replica, stream: Iterable[bytes]) -> None:
        prefix = f"[{replica.label}] "
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._lock:
                self.echo(prefix + line)

    def _start(self, replica: Replica) -> None:
        try:
            replica.proc = subprocess.Popen(
                replica.argv, env=replica.env, cwd=replica.cwd, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:  # the command is looked up on this machine
            raise ManifestError(f"{self.kind} {self.name}: {replica.label}: cannot run "
                                f"{replica.argv[0]!r} here: {exc.strerror}") from None
        thread = threading.Thread(target=self._pump, args=(replica, replica.proc.stdout),
                                  daemon=True)
        thread.start()
        replica.threads.append(thread)

    def _terminate(self, replicas: Iterable[Replica], sig: int = signal.SIGTERM,
                   grace_s: float | None = None) -> None:
        """`sig`, then SIGKILL after `grace_s` (default kill_grace_s) to each process tree."""
        alive = [r for r in replicas if r.proc is not None and r.proc.poll() is None]
        stop_process_trees([r.proc.pid for r in alive], sig,
                           self.kill_grace_s if grace_s is None else grace_s)
        for r in alive:
            r.proc.wait()

    def _retryable(self, replica: Replica, code: int) -> bool:
        if replica.restart_policy in ("OnFailure", "Always"):
            return True
        return replica.restart_policy == "ExitCode" and code in operator.RETRYABLE_EXIT_CODES

    def run(self, poll_s: float = 0.05) -> LocalResult:
        """Start every replica, supervise them, and return the job's outcome."""
        kinds = ", ".join(f"{r.label}" for r in self.replicas)
        log.info("%s %s: running %s locally (workdir %s)", self.kind, self.name, kinds,
                 self.workdir)
        start = time.monotonic()
        has_master = any(r.rtype == "Master" for r in self.replicas)
        with recorded_signals() as stop:
            return self._supervise(stop, start, has_master, poll_s)

    def _supervise(self, stop: list[int], start: float, has_master: bool,
                   poll_s: float) -> LocalResult:
        restarts = 0
        try:
            for r in self.replicas:
                self._start(r)
            while True:
                if stop:  # SIGTERM/SIGINT to us: as a pod deletion, to every replica
                    return self._stopped(stop[0], restarts)
                for r in self.replicas:
                    if r.done or r.proc.poll() is None:
                        continue
                    code = _exit_code(r.proc.returncode)
                    if code == 0:
                        r.done = True
                        continue
                    limit = self.backoff_limit
                    if self._retryable(r, code) and (limit is None or restarts < limit):
                        restarts += 1
                        log.warning("%s %s: %s exited with code %d; restarting "
                                    "(restartPolicy %s, restart %d of backoffLimit %s)",
                                    self.kind, self.name, r.label, code, r.restart_policy,
                                    restarts, limit)
                        self._start(r)
                        continue
                    why = (f"backoffLimit={limit} reached" if self._retryable(r, code)
                           else f"restartPolicy {r.restart_policy}")
                    self._terminate(self.replicas)
                    return self._finish(LocalResult(
                        False, code, f"replica {r.label} exited with code {code} ({why})",
                        restarts))
                if self._succeeded(has_master):
                    self._wait_stragglers()
                    return self._finish(LocalResult(True, 0, "succeeded", restarts))
                if self.deadline_s is not None and time.monotonic() - start > self.deadline_s:
                    self._terminate(self.replicas)
                    return self._finish(LocalResult(
                        False, 1, f"exceeded runPolicy.activeDeadlineSeconds="
                        f"{self.deadline_s}", restarts))
                time.sleep(poll_s)
        except BaseException:
            self._terminate(self.replicas)
            raise

    def _stopped(self, signum: int, restarts: int) -> LocalResult:
        name, grace = signal.Signals(signum).name, max(r.grace_s for r in self.replicas)
        log.warning("%s %s: %s: sent to every replica, SIGKILL after %gs "
                    "(terminationGracePeriodSeconds)", self.kind, self.name, name, grace)
        self._terminate(self.replicas, signum, grace)
        return self._finish(LocalResult(False, 128 + signum, f"stopped by {name}", restarts,
                                        stopped=True))

    def _succeeded(self, has_master: bool) -> bool:
        if has_master:
            return any(r.done for r in self.replicas if r.rtype == "Master")
        workers = [r for r in self.replicas if r.rtype == "Worker"]
        return all(r.done for r in workers) or bool(self.elastic and any(
            r.done for r in workers))

    def _wait_stragglers(self) -> None:
        """After success, give the other replicas `finish_grace_s` to exit, then stop them
        (cleanPodPolicy Running)."""
        end = time.monotonic() + self.finish_grace_s
        for r in self.replicas:
            try:
                r.proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        self._terminate(self.replicas)

    def _finish(self, result: LocalResult) -> LocalResult:
        for r in self.replicas:
            for t in r.threads:
                t.join(timeout=5)
        if self._own_workdir:  # emptyDirs and configMap files live as long as the pods
            shutil.rmtree(self.workdir, ignore_errors=True)
        if result.succeeded:
            log.info("%s %s succeeded locally (%d restarts)", self.kind, self.name,
                     result.restarts)
        else:
            log.error("%s %s failed: %s", self.kind, self.name, result.reason)
        return result


def run_local(job: Any, *, mounts: Mapping[str, str] | None = None,
              env: Mapping[str, str] | None = None, workdir: str | Path | None = None,
              echo: Callable[[str], None] | None = None, **kwargs: Any) -> int:
    """Run a PyTorchJob (path to YAML, dict, list of documents or `RenderedJob`) locally.

    Returns 0 when the job succeeded, else the failing replica's exit code (>= 1).
    `mounts` maps a volume's mountPath (or PVC name) to a local directory.
    """
    result = LocalJob(job, mounts=mounts, env=env, workdir=workdir, echo=echo, **kwargs).run()
    return 0 if result.succeeded else max(1, result.exit_code)
