"""A warm step host for kfp.local: the steps' heavy imports paid once per pipeline run.

kfp.local's SubprocessRunner starts a new Python process for every task, and each step
then imports mlflow and its SQL store, torch, webdataset and scikit-learn: 2.5-4 s of a
2-core machine per step before any work, five steps per run. `cnnflow pipeline run` starts
this host first; it imports all of that once (while the driver builds the pipeline and
kfp.local starts the first task) and then serves every step in a child forked from the
warm process. The component process stays the task KFP sees: its `cnnflow.kfp.steps`
function, wrapped by `hosted`, sends the call (name, arguments, the artifacts' paths and
metadata, environment, working directory, logging format) and its stdout/stderr file
descriptors over a Unix socket. The child runs the same function with the component's
streams, environment and directory and answers with the return value and the artifacts'
metadata, or the error: a CnnflowError comes back as the same one-line CnnflowError.

    host = start_host(dir)           # the driver; exports CNNFLOW_STEP_HOST
    ...                              # every hosted step runs in a forked child
    host.stop()

Only kfp.local uses it (in a cluster every step is its own pod), and only when
`cnnflow pipeline run` is asked to (the default; `--no-step-host` runs each step in its
own component process, as the cluster does). The host never runs a torch operation
itself, so every child starts with torch's thread pools uninitialised (fork-safe), and
it has no threads when it forks. A child whose component process goes away (the task was
killed) is interrupted like a Ctrl-C, so the step's own cleanup runs.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnflow.errors import CnnflowError

HOST_ENV = "CNNFLOW_STEP_HOST"
"""The host's socket path; set for kfp.local's task processes by `start_host`."""
# What the steps import, in the order the steps need it: mlflow and its SQL stores (every
# step), then torch and webdataset (shard, train), scikit-learn's metrics and matplotlib's
# Agg figure (evaluate). A step that arrives before the list is through is served at the
# next module boundary; its child imports the rest itself.
PRELOAD = (
    "mlflow", "mlflow.store.tracking.sqlalchemy_store", "cnnflow.tracking.mlflow_tracker",
    "cnnflow.stages", "cnnflow.kfp.steps", "mlflow.store.model_registry.sqlalchemy_store",
    "torch", "webdataset", "cnnflow.data.shards", "cnnflow.launch",
    "cnnflow.launch.local", "cnnflow.launch.kubernetes",
    "sklearn.metrics", "matplotlib.figure", "matplotlib.backends.backend_agg",
    "cnnflow.evaluate", "cnnflow.registry",
)
_HEADER = struct.Struct("!Q")
log = logging.getLogger("cnnflow")


# -- framing: 8-byte length + JSON ---------------------------------------------------------

def _send(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj, default=str).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> Any:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return json.loads(_recv_exact(sock, size))


# -- the component's side ------------------------------------------------------------------

class _Artifact:
    """What a step uses of a KFP artifact: `.path`, `.metadata`, Metrics' `log_metric`."""

    def __init__(self, path: str, metadata: dict[str, Any]) -> None:
        self.path = path
        self.metadata = metadata

    def log_metric(self, metric: str, value: float) -> None:
        self.metadata[metric] = value


def _is_artifact(value: Any) -> bool:
    return hasattr(value, "path") and isinstance(getattr(value, "metadata", None), dict)


def _logging_setup() -> dict[str, Any]:
    handlers = []
    for h in logging.getLogger().handlers:
        stream = getattr(h, "stream", None)
        fd = 1 if stream is sys.stdout else 2 if stream is sys.stderr else None
        if fd and h.formatter is not None:
            handlers.append({"fd": fd, "format": h.formatter._fmt})
    return {"level": logging.getLogger().level, "handlers": handlers}


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise CnnflowError(f"step host {path} does not answer ({exc.strerror or exc}); "
                           f"run without it: cnnflow pipeline run --no-step-host") from None
    return sock


def call(path: str, step: str, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run `cnnflow.kfp.steps.<step>(*args, **kwargs)` in a child of the host at `path`."""
    artifacts = {k: v for k, v in kwargs.items() if _is_artifact(v)}
    plain = {k: v for k, v in kwargs.items() if k not in artifacts}
    sys.stdout.flush()
    sys.stderr.flush()
    with _connect(path) as sock:
        socket.send_fds(sock, [b"."], [sys.stdout.fileno(), sys.stderr.fileno()])
        _send(sock, {
            "step": step, "args": list(args), "kwargs": plain,
            "artifacts": {k: {"path": str(a.path), "metadata": dict(a.metadata)}
                          for k, a in artifacts.items()},
            "env": dict(os.environ), "cwd": os.getcwd(), "logging": _logging_setup(),
        })
        try:
            reply = _recv(sock)
        except EOFError:
            raise RuntimeError(f"step host child running {step} died without an answer "
                               f"(its output is above)") from None
    for name, metadata in reply.get("artifacts", {}).items():
        artifacts[name].metadata.update(metadata)
    if reply["ok"]:
        return reply["value"]
    if reply["kind"] == "cnnflow":
        raise CnnflowError(reply["error"])
    raise RuntimeError(f"{step} failed in the step host: {reply['error']} "
                       f"(traceback above)")


def hosted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` (a function of cnnflow.kfp.steps) in the step host when $CNNFLOW_STEP_HOST
    names one, else here."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        path = os.environ.get(HOST_ENV)
        if not path:
            return fn(*args, **kwargs)
        return call(path, fn.__name__, args, kwargs)

    wrapper.local = fn  # type: ignore[attr-defined]
    return wrapper


# -- the host's side -----------------------------------------------------------------------

def _child(conn: socket.socket) -> int:
    """Serve one call in this forked child; the exit status is 0 unless the reply failed."""
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _, fds, _, _ = socket.recv_fds(conn, 1, 2)
    request = _recv(conn)
    for target, fd in zip((1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(HOST_ENV, None)  # the step runs here, and its own children are plain
    os.chdir(request["cwd"])
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(request["logging"]["level"])
    for h in request["logging"]["handlers"]:
        handler = logging.StreamHandler(sys.stdout if h["fd"] == 1 else sys.stderr)
        handler.setFormatter(logging.Formatter(h["format"]))
        root.addHandler(handler)

    done = threading.Event()

    def watch() -> None:  # the component process went away: interrupt the step
        with contextlib.suppress(OSError):
            conn.recv(1)
        if not done.is_set():
            signal.raise_signal(signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    artifacts = {k: _Artifact(v["path"], v["metadata"])
                 for k, v in request["artifacts"].items()}
    steps = importlib.import_module("cnnflow.kfp.steps")
    fn = getattr(steps, request["step"])
    fn = getattr(fn, "local", fn)
    try:
        value = fn(*request["args"], **request["kwargs"], **artifacts)
        reply = {"ok": True, "value": value}
    except CnnflowError as exc:
        reply = {"ok": False, "kind": "cnnflow", "error": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - reported to the component, which fails
        traceback.print_exc()
        reply = {"ok": False, "kind": "internal", "error": f"{type(exc).__name__}: {exc}"}
    reply["artifacts"] = {k: a.metadata for k, a in artifacts.items()}
    sys.stdout.flush()
    sys.stderr.flush()
    done.set()
    try:
        _send(conn, reply)
    except OSError:
        return 1
    return 0


def _fork_child(server: socket.socket, conn: socket.socket) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        server.close()
        code = 1
        try:
            code = _child(conn)
            atexit._run_exitfuncs()  # what a normal exit runs: flushes, mlflow's hooks
        finally:
            os._exit(code)
    conn.close()


def serve(fd: int) -> None:
    """Accept on the listening socket `fd` and fork one child per connection, until
    SIGTERM, importing PRELOAD meanwhile. Components that connect early wait in the
    socket's backlog until the current import is done; once this process is gone,
    connecting fails at once."""
    server = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    # nothing to clean up: the children are on their own, and a normal interpreter exit
    # (torch's and mlflow's finalizers) would take a second or more
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    for name in PRELOAD:
        while select.select([server], [], [], 0)[0]:
            _fork_child(server, server.accept()[0])
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the child imports it again and reports
            print(f"step host: preloading {name} failed ({exc}); the step will import it",
                  file=sys.stderr)
        if threading.active_count() != 1:
            raise SystemExit(f"step host: importing {name} started a thread; a forked "
                             f"child would inherit its locks (cnnflow pipeline run "
                             f"--no-step-host runs without the host)")
    while True:
        try:
            conn, _ = server.accept()
        except (InterruptedError, ConnectionAbortedError):  # a caller gone before accept
            continue
        _fork_child(server, conn)


class StepHost:
    """The host process started by `start_host`; `stop()` ends it (and removes the socket)."""

    def __init__(self, proc: subprocess.Popen, path: Path) -> None:
        self.proc, self.path = proc, path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.path.unlink(missing_ok=True)
        if os.environ.get(HOST_ENV) == str(self.path):
            os.environ.pop(HOST_ENV)

    def __enter__(self) -> StepHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_host(directory: str | Path) -> StepHost:
    """Start a host listening on <directory>/steps.sock and export the path as
    $CNNFLOW_STEP_HOST (kfp.local's task processes inherit it). The socket is bound here,
    so it exists before any task starts; the host only accepts on it."""
    path = Path(directory) / "steps.sock"
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(16)
        proc = subprocess.Popen([sys.executable, "-m", "cnnflow.kfp.host",
                                 str(server.fileno())],
                                stdin=subprocess.DEVNULL, pass_fds=[server.fileno()])
    os.environ[HOST_ENV] = str(path)
    return StepHost(proc, path)


if __name__ == "__main__":
    try:
        serve(int(sys.argv[1]))
    except KeyboardInterrupt:
        sys.exit(130)
