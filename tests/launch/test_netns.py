"""A 2-node PyTorchJob over a real link: each replica in its own network namespace.

The fixture makes two namespaces joined by a veth pair (each end is `eth0` in its
namespace, 10.213.0.1/24 and 10.213.0.2/24, `lo` up) and an /etc/hosts per namespace
(through `ip netns exec`'s /etc/netns/NAME/) that maps this host's name to the
namespace's address, as the kubelet's /etc/hosts maps a pod's name to its IP (gloo picks
its interface from that name). LocalJob places master-0 and worker-0 there
(`cnnflow.launch.hosts.Host`), so MASTER_ADDR names the other host, and the rendezvous
and gloo cross the link, which the test cuts mid-training and brings back.

Needs root (`ip netns`); where namespaces cannot be made the test fails, saying so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cnnflow.configs.launch import LaunchConfig
from cnnflow.launch.hosts import Host
from cnnflow.launch.local import LocalJob
from cnnflow.launch.pytorchjob import render_job
from cnnflow.launch.validate import ManifestError

from .conftest import params_text

TIMEOUT_S = 5  # parallel.init_timeout_s: the process group's timeout for every collective
WAIT_S = 240.0  # a hang guard for each awaited event (4 interpreters start on 2 cores)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class TwoHosts:
    """Two namespaces on one link; `place` maps replica labels onto them in order."""

    names: tuple[str, str]
    addrs: tuple[str, str] = ("10.213.0.1", "10.213.0.2")
    dev: str = "eth0"

    def place(self, labels: list[str]) -> dict[str, Host]:
        return {label: Host(addr, ("ip", "netns", "exec", ns))
                for label, ns, addr in zip(labels, self.names, self.addrs, strict=True)}

    def link(self, index: int, up: bool) -> None:
        _ip("-n", self.names[index], "link", "set", self.dev, "up" if up else "down")


def _make(net: TwoHosts, tag: str) -> None:
    ends = (f"{tag}a", f"{tag}b")
    for ns in net.names:
        _ip("netns", "add", ns)
    _ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
    hostname = os.uname().nodename
    for ns, end, addr in zip(net.names, ends, net.addrs, strict=True):
        _ip("link", "set", end, "netns", ns)
        _ip("-n", ns, "link", "set", end, "name", net.dev)
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", net.dev)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", net.dev, "up")
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{addr} {hostname}\n")


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    tag = f"cfn{os.getpid() % 100000}"
    net = TwoHosts((f"{tag}-0", f"{tag}-1"))
    problem = None
    try:
        _make(net, tag)
    except (RuntimeError, OSError) as exc:
        problem = str(exc)
    if problem is not None:
        _remove(net)
        pytest.fail(f"cannot make network namespaces (needs root and `ip netns`): {problem}",
                    pytrace=False)
    try:
        yield net
    finally:
        _remove(net)


def _remove(net: TwoHosts) -> None:
    for ns in net.names:  # deleting a namespace deletes the veth end in it, and its peer
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    with contextlib.suppress(OSError):  # only if empty: the namespaces' files are gone
        Path("/etc/netns").rmdir()


class Events:
    """The job's output lines and the `cnnflow` logger's warnings, with waiting on them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.cond = threading.Condition()

    def echo(self, line: str) -> None:
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()

    def lost(self, label: str) -> list[str]:
        """The replica's 'lost contact' error lines."""
        return [x for x in self.lines if x.startswith(f"[{label}] ") and "lost contact" in x]

    def warn(self, message: str) -> None:
        with self.cond:
            self.warnings.append(message)
            self.cond.notify_all()

    def wait(self, what: str, ok: Callable[[], bool], done: Callable[[], bool]) -> None:
        """Until `ok()`; fails when `done()` (the job ended) or after WAIT_S first."""
        end = time.monotonic() + WAIT_S
        with self.cond:
            while not ok():
                if done() or time.monotonic() > end:
                    tail = "\n".join(self.lines[-40:])
                    pytest.fail(f"never saw {what}; last lines:\n{tail}", pytrace=False)
                self.cond.wait(0.05)  # also wakes for `ok`s that watch files


@pytest.fixture
def events() -> Iterator[Events]:
    ev = Events()

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            ev.warn(record.getMessage())

    logger = logging.getLogger("cnnflow")
    handler, level = _Handler(logging.WARNING), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    yield ev
    logger.removeHandler(handler)
    logger.setLevel(level)


def _pytorchjob(ws: Path, name: str, **overrides: str) -> Path:
    text = params_text([f"{k}={v}" for k, v in overrides.items()])
    rendered = render_job(LaunchConfig(tracking_uri="", nodes=2, restart_policy="OnFailure",
                                       backoff_limit=4), name=name, params_yaml=text)
    job_file = ws / "job.yaml"
    job_file.write_text(rendered.to_yaml())
    return job_file


@contextlib.contextmanager
def _running(job: LocalJob) -> Iterator[tuple[threading.Thread, list]]:
    """The job's supervisor in a thread; its replicas are stopped if the test ends first."""
    result: list = []
    runner = threading.Thread(target=lambda: result.append(job.run()), daemon=True)
    runner.start()
    try:
        yield runner, result
    finally:
        if runner.is_alive():
            job._terminate(job.replicas)
            runner.join(WAIT_S)


def _cut_and_restore(runner: threading.Thread, events: Events, net: TwoHosts,
                     ckpt: Path) -> tuple[float, float]:
    """Cut the link after the first checkpoint, restore it once both replicas failed and
    exited; (seconds from the cut to both errors, to the job's end)."""
    ended = lambda: not runner.is_alive()  # noqa: E731
    # both replicas joined across the link: rank 1 reached the master at 10.213.0.1
    events.wait("both ranks joining", lambda: sum(
        "joined gloo group" in x for x in events.lines) == 2, ended)
    events.wait("a checkpoint", lambda: any(ckpt.glob("step-*.pt")), ended)
    net.link(0, up=False)
    cut = time.monotonic()
    events.wait("both sides' errors",
                lambda: events.lost("master-0") and events.lost("worker-0"), ended)
    seen = time.monotonic() - cut
    events.wait("both replicas restarting", lambda: sum(
        "restarting" in w for w in events.warnings) >= 2, ended)
    net.link(0, up=True)
    runner.join(WAIT_S)
    return seen, time.monotonic() - cut


@pytest.mark.distributed
@pytest.mark.slow
def test_link_cut_names_the_peer_and_the_job_resumes(tmp_path, digits_shards, two_hosts,
                                                      events):
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "shards").symlink_to(digits_shards)
    run = ws / "runs" / "netns"
    ckpt, out = run / "checkpoints", run / "train"
    job_file = _pytorchjob(
        ws, "netns", **{"train.shards": f"{ws}/data/shards", "train.out_dir": str(out),
                        "checkpoint.dir": str(ckpt), "checkpoint.every_steps": "5",
                        "parallel.init_timeout_s": str(TIMEOUT_S), "train.epochs": "4",
                        "train.max_steps": "40", "train.batch_size": "32",
                        "model.width": "4", "train.log_every": "1"})
    job = LocalJob(job_file, mounts={"/workspace": str(ws)}, echo=events.echo,
                   hosts=two_hosts.place(["master-0", "worker-0"]), kill_grace_s=5)
    with _running(job) as (runner, result):
        seen, total = _cut_and_restore(runner, events, two_hosts, ckpt)
    assert result and result[0].succeeded, "\n".join(events.lines[-40:])
    (master_err,), (worker_err,) = events.lost("master-0"), events.lost("worker-0")
    assert master_err == (
        f"[master-0] cnnflow: error: rank 0 (10.213.0.1) lost contact with rank 1 "
        f"(10.213.0.2) for {TIMEOUT_S} s during a collective; check the network between the "
        f"nodes (the limit is parallel.init_timeout_s={TIMEOUT_S})")
    assert worker_err.startswith(
        "[worker-0] cnnflow: error: rank 1 (10.213.0.2) lost contact with rank 0 (10.213.0.1) "
        f"for {TIMEOUT_S} s during a collective")
    assert not any("Traceback" in x for x in events.lines)
    # one restart per side; a restarted replica whose peer is still starting can time out
    # forming the group (the same parallel.init_timeout_s) and restart once more
    assert result[0].restarts >= 2
    resumed = [x for x in events.lines if x.startswith("[master-0] ") and "resumed from" in x]
    assert len(resumed) == 1, "\n".join(events.lines[-40:])
    step = int(resumed[0].split(" at step ")[1].split()[0])
    assert step >= 5 and step % 5 == 0
    rows = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x]
    assert rows[-1]["step"] == 40
    assert (out / "model.pt").is_file()
    print(f"errors {seen:.1f} s after the cut (timeout {TIMEOUT_S} s); job done "
          f"{total:.1f} s after the cut")


def test_placement_sets_addresses_and_the_argv_prefix(tmp_path):
    """No namespaces needed: what LocalJob plans for placed replicas."""
    job_file = _pytorchjob(tmp_path, "placed")
    hosts = {"master-0": Host("10.213.0.1", ("ip", "netns", "exec", "a")),
             "worker-0": Host("10.213.0.2", ("ip", "netns", "exec", "b"))}
    job = LocalJob(job_file, mounts={"/workspace": str(tmp_path)}, hosts=hosts,
                   workdir=tmp_path / "wd")
    master, worker = job.replicas
    assert master.argv[:4] == ["ip", "netns", "exec", "a"]
    assert worker.argv[:4] == ["ip", "netns", "exec", "b"]
    for r in (master, worker):
        assert r.env["MASTER_ADDR"] == r.env["PET_MASTER_ADDR"] == "10.213.0.1"


def test_hosts_for_an_unknown_replica_are_refused(tmp_path):
    job_file = _pytorchjob(tmp_path, "placed")
    with pytest.raises(ManifestError) as err:
        LocalJob(job_file, mounts={"/workspace": str(tmp_path)}, workdir=tmp_path / "wd",
                 hosts={"worker-1": Host("10.213.0.3")})
    assert str(err.value) == ("PyTorchJob placed: hosts for worker-1: no such replica "
                              "(expected labels among master-0, worker-0)")


def test_lost_contact_names_every_peer_and_leaves_other_errors_alone(monkeypatch):
    from cnnflow.distributed import env as env_module
    from cnnflow.distributed.env import DistEnv, lost_contact

    monkeypatch.setattr(env_module, "_ADDRESSES", {3: "10.0.0.3"})
    env = DistEnv(rank=2, world_size=6)
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer "
                        "[10.0.0.3]:40123")
    assert str(lost_contact(gloo, env, 30.0)) == (
        "rank 2 (?) lost contact with rank 0 (?), rank 1 (?), rank 3 (10.0.0.3), rank 4 (?) and 1 "
        "more (connection closed by peer) during a collective; check the network between "
        "the nodes (the limit is parallel.init_timeout_s=30)")
    assert lost_contact(RuntimeError("CUDA out of memory"), env, 30.0) is None
    assert lost_contact(gloo, DistEnv(), 30.0) is None  # no group, no peer
