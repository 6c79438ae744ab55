"""A real `mlflow server` as a managed subprocess.

    cnnflow mlflow-server                     # run_server("mlflow/mlflow.db", "mlflow/artifacts")
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 cnnflow train
    cnnflow mlflow-server --host 0.0.0.0 --allowed-hosts mlflow.cnnflow.svc:5000,127.0.0.1:5000

The server binds to 127.0.0.1 only; to expose it (a cluster Service) bind 0.0.0.0 and
name the Service host in `allowed_hosts`, or its security middleware answers 403. Host
headers carry the port (`mlflow.cnnflow.svc:5000`; `mlflow.cnnflow.svc:*` matches any),
and the list replaces MLflow's default one (localhost and private IPs); /health and
/version answer whatever the Host.
`--serve-artifacts --artifacts-destination` makes the server the only writer of the
artifact directory: clients upload over HTTP and never need its disk.

The subprocess runs in its own session (process group), so stopping it also stops the
uvicorn worker it starts. MLflow's background job runner (GenAI scorers and prompt
optimisation, ~7 huey processes that triple the start-up time) is off unless
MLFLOW_SERVER_ENABLE_JOB_EXECUTION is set.

Production storage: the store may be PostgreSQL and the artifacts a bucket, and the
server may require a login (MLflow's basic-auth app, its users in a database of their own):

    PGPASSWORD=... cnnflow mlflow-server --store postgresql://mlflow@db:5432/mlflow \
        --artifacts s3://bucket/mlflow --workers 4 --auth mlflow/cluster/basic_auth.ini

`run_server` first checks that the database answers, the password is right, the bucket
exists and the auth config is MLflow's (`server_checks`): one line each when not.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cnnflow.errors import CnnflowError

MLFLOW = [sys.executable, "-m", "mlflow"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process may take it before we bind)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def store_uri(store: str | Path) -> str:
    """`mlflow/mlflow.db` -> `sqlite:////abs/mlflow/mlflow.db`; `postgresql://...` ->
    `postgresql+psycopg2://...` (SQLAlchemy 2.1's default driver for it is psycopg 3; the
    one installed is psycopg2); other URIs pass through."""
    text = str(store)
    scheme, sep, rest = text.partition("://")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg2://{rest}"
    if sep:
        return text
    path = Path(text).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


class ManagedProcess:
    """A subprocess in its own process group, with a URL it answers on when ready."""

    def __init__(self, cmd: list[str], url: str, probe: str, log_path: str | Path | None,
                 env: dict[str, str] | None = None, *, inherit_output: bool = False) -> None:
        """Output goes to `log_path`, else to this process's (`inherit_output`), else away."""
        self.url, self.probe, self.cmd = url, probe, cmd
        self.log_path = Path(log_path) if log_path else None
        out = (open(self.log_path, "ab") if self.log_path  # noqa: SIM115
               else None if inherit_output else subprocess.DEVNULL)
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})},
                                         start_new_session=True)
        finally:
            if out not in (None, subprocess.DEVNULL):
                out.close()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise CnnflowError(f"{' '.join(self.cmd[2:4])} exited with code "
                                   f"{self.proc.returncode}; see {self.log_path or 'its output'}")
            if _answers(self.url + self.probe):
                return
            time.sleep(0.25)
        self.stop()
        raise CnnflowError(f"{self.url}{self.probe} did not answer within {timeout_s:.0f} s; "
                           f"see {self.log_path or 'its output'}")

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # pgid == pid: start_new_session made it a leader

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL after `timeout_s`."""
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        self._signal_group(signal.SIGKILL)  # workers that outlived their parent

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, for fault tests."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait()


def artifacts_destination(artifacts: str | Path) -> str:
    """A bucket URI (`s3://bucket/prefix`, any `scheme://`) as is; a directory made absolute."""
    text = str(artifacts)
    return text if "://" in text else str(Path(text).resolve())


def server_command(store: str | Path, artifacts_dir: str | Path, host: str = "127.0.0.1",
                   port: int = 5000, *, allowed_hosts: str | None = None, workers: int = 1,
                   auth: bool = False) -> list[str]:
    """The `mlflow server` argv. `allowed_hosts` (comma-separated Host headers, with their
    port: `mlflow.cnnflow.svc:5000`) replaces MLflow's default list, localhost and private
    IPs, so name every host clients use, 127.0.0.1:<port> included. `auth`: MLflow's
    basic-auth app (its config comes from MLFLOW_AUTH_CONFIG_PATH)."""
    if workers < 1:
        raise CnnflowError(f"--workers {workers}: expected at least 1")
    cmd = [*MLFLOW, "server", "--host", host, "--port", str(port),
           "--backend-store-uri", store_uri(store), "--serve-artifacts",
           "--artifacts-destination", artifacts_destination(artifacts_dir),
           "--workers", str(workers)]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    if allowed_hosts:
        hosts = [h.strip() for h in allowed_hosts.split(",")]
        if not all(hosts):
            raise CnnflowError(f"--allowed-hosts {allowed_hosts!r}: expected comma-separated "
                               f"host names (host:port or host:*), got an empty one")
        cmd += ["--allowed-hosts", ",".join(hosts)]
    return cmd


def check_storage(store: str | Path, artifacts: str | Path,
                  auth_config: str | Path | None = None) -> Path | None:
    """Fail with one line unless the PostgreSQL store answers, the bucket exists and the
    auth config is MLflow's; returns the auth config's absolute path."""
    from cnnflow.tracking import server_checks

    if server_checks.is_postgres(str(store)):
        server_checks.check_postgres(str(store))
    if str(artifacts).startswith("s3://"):
        server_checks.check_bucket(str(artifacts))
    return server_checks.check_auth_config(auth_config) if auth_config else None


def start_server(store: str | Path, artifacts_dir: str | Path, host: str = "127.0.0.1",
                 port: int = 5000, *, allowed_hosts: str | None = None, workers: int = 1,
                 auth_config: str | Path | None = None,
                 log_path: str | Path | None = None, timeout_s: float = 90.0,
                 wait: bool = True, inherit_output: bool = False) -> ManagedProcess:
    """Start `mlflow server` and return once `/health` answers (or at once: `wait=False`,
    then call `.wait_ready(timeout_s)` before using it). `auth_config`: a basic_auth.ini;
    the server then requires a login (MLFLOW_FLASK_SERVER_SECRET_KEY, the CSRF key, is
    made up for this server's lifetime unless set)."""
    if "://" not in str(artifacts_dir):
        Path(artifacts_dir).resolve().mkdir(parents=True, exist_ok=True)
    cmd = server_command(store, artifacts_dir, host, port, allowed_hosts=allowed_hosts,
                         workers=workers, auth=auth_config is not None)
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION":
           os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    if auth_config is not None:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(Path(auth_config).resolve())
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = (os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
                                                 or secrets.token_hex(32))
    server = ManagedProcess(cmd, f"http://{host}:{port}", "/health", log_path, env,
                            inherit_output=inherit_output)
    if wait:
        server.wait_ready(timeout_s)
    return server


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kubectl delete, systemd) stops it like Ctrl-C


def run_server(store: str | Path = "mlflow/mlflow.db", artifacts_dir: str | Path =
               "mlflow/artifacts", host: str = "127.0.0.1", port: int = 5000,
               allowed_hosts: str | None = None, workers: int = 1,
               auth_config: str | Path | None = None) -> None:
    """Check the storage, then run the tracking server in the foreground, its log on this
    terminal, until Ctrl-C (or SIGTERM). A new PostgreSQL database is migrated on the first
    start (MLflow's schema, then the auth one): that can take a minute or two."""
    from cnnflow.tracking.server_checks import redact

    auth = check_storage(store, artifacts_dir, auth_config)
    server = start_server(store, artifacts_dir, host, port, allowed_hosts=allowed_hosts,
                          workers=workers, auth_config=auth, inherit_output=True,
                          timeout_s=300)
    print(f"MLflow server at {server.url} (store {redact(store_uri(store))}, artifacts "
          f"{artifacts_destination(artifacts_dir)}{', login required' if auth else ''}); "
          f"Ctrl-C stops it", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
    print("MLflow server stopped", flush=True)
