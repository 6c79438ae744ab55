"""Real servers for tests, started by fixtures only: a PostgreSQL cluster and an S3 emulator,
both on free loopback ports, both gone when their context manager exits.

    with postgres_server() as pg:     # initdb + pg_ctl in a temporary directory
        pg.uri("mlflow")              # postgresql://cnnflow:<password>@127.0.0.1:<port>/mlflow
    with s3_server() as s3:           # moto's S3 emulator (ThreadedMotoServer)
        s3.client().create_bucket(Bucket="b")
    server = MlflowServer(["--store", ...], env, cwd); server.wait_ready(); server.stop()

PostgreSQL comes from the distribution's server package (Debian: `postgresql`); the
binaries are found on PATH or in `pg_config --bindir`. Without them the fixture fails with
one line saying what to install (never skips). initdb refuses to run as root, so as root
the cluster runs as the `postgres` user, in a directory it owns.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_USER = "cnnflow"
CNNFLOW = str(Path(sys.executable).with_name("cnnflow"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bindir() -> Path:
    """The directory holding initdb and pg_ctl: PATH first, then `pg_config --bindir`."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                "`pg_config --bindir`: install the server package (Debian: apt-get install "
                "postgresql)", pytrace=False)


@dataclass
class Postgres:
    """A running PostgreSQL cluster: superuser `user` with `password`, on 127.0.0.1:port."""

    bindir: Path
    root: Path
    port: int
    password: str = field(repr=False)
    user: str = PG_USER
    host: str = "127.0.0.1"

    def uri(self, database: str, *, password: str | None = None) -> str:
        """A SQLAlchemy URI (MLflow's --backend-store-uri) for `database`."""
        secret = self.password if password is None else password
        return f"postgresql://{self.user}:{secret}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                password=self.password, dbname=database, connect_timeout=10)

    def create_database(self, name: str) -> str:
        conn = self.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name


def _as_postgres(cmd: list[str]) -> list[str]:
    """As root, run `cmd` as the `postgres` user (initdb refuses root)."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        pytest.fail("running as root needs `runuser` (util-linux) to start PostgreSQL as "
                    "the postgres user", pytrace=False)
    return ["runuser", "-u", "postgres", "--", *cmd]


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    proc = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:] if log and log.is_file() else ""
        pytest.fail(f"{what} failed ({proc.returncode}): {proc.stderr.strip()} {tail}",
                    pytrace=False)


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """initdb + pg_ctl start in a temporary directory; password authentication on TCP
    (scram-sha-256), listening on 127.0.0.1 only, socket in the same directory."""
    bindir = _pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="cnnflow-pg-"))
    pg = Postgres(bindir, root, free_port(), secrets.token_urlsafe(16))
    (root / "pwfile").write_text(pg.password + "\n")
    if os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chown(root / "pwfile", entry.pw_uid, entry.pw_gid)
    data, log = root / "data", root / "server.log"
    try:
        _run([str(bindir / "initdb"), "-D", str(data), "-U", pg.user, "-E", "UTF8",
              "--auth=scram-sha-256", f"--pwfile={root / 'pwfile'}", "--no-sync",
              "--no-instructions"], "initdb")
        options = (f"-p {pg.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c full_page_writes=off -c synchronous_commit=off")
        _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
              "-t", "60", "start"], "pg_ctl start", log)
        try:
            yield pg
        finally:
            subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m",
                                         "fast", "-w", "stop"]), capture_output=True,
                           timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class S3:
    """A running S3 emulator at `endpoint`, with the credentials clients must send."""

    endpoint: str
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """What a client process (mlflow server, dvc, boto3) needs to reach it."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    """An S3 emulator: moto's server mode (ThreadedMotoServer) on a free loopback port,
    in this process; other processes reach it over HTTP. Its state lives in memory."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


class MlflowServer:
    """`cnnflow mlflow-server ...` in its own process group; ready once it prints its
    banner (after /health answered). Its output is kept for failure messages."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([CNNFLOW, "mlflow-server", "--port", str(self.port),
                                      *args], env=env, cwd=cwd, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._banner: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("MLflow server at"):
                self._banner.put(line)
        self._banner.put("")  # exited

    def wait_ready(self, timeout_s: float = 300) -> str:
        banner = self._banner.get(timeout=timeout_s)
        assert banner, f"the server exited ({self.proc.wait()}):\n{''.join(self.lines)[-3000:]}"
        return banner

    def stop(self) -> int:
        """SIGTERM, as kubectl delete sends it: the server stops and says so."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # nothing left behind
