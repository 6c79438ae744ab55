"""Real servers for tests, started by fixtures only: a PostgreSQL cluster and an S3 emulator,
both on free loopback ports, both gone when their context manager exits.

    with postgres_server() as pg:     # initdb + pg_ctl in a temporary directory
        pg.uri("mlflow")              # postgresql://cnnflow:<password>@127.0.0.1:<port>/mlflow
    with s3_server() as s3:           # moto's S3 emulator, in its own process
        s3.client().create_bucket(Bucket="b")
    server = MlflowServer(["--store", ...], env, cwd); server.wait_ready(); server.stop()

PostgreSQL comes from the distribution's server package (Debian: `postgresql`); the
binaries are found on PATH or in `pg_config --bindir`. Without them the fixture fails with
one line saying what to install (never skips). initdb refuses to run as root, so as root
the cluster runs as the `postgres` user, in a directory it owns.
"""

from __future__ import annotations

import contextlib
import json
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
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
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
    """A running S3 emulator at `endpoint`, with the key pair clients must send."""

    endpoint: str
    key: str = "testing"
    secret: str = field(default="testing", repr=False)
    region: str = "us-east-1"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What a client process (mlflow server, dvc, boto3, cnnflow) needs to reach it."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint, **self.extra_env}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.key, aws_secret_access_key=self.secret)

    def bucket(self) -> str:
        """A new, empty bucket's name."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


_IAM_BOOTSTRAP_CALLS = 3  # create_user, create_access_key, put_user_policy: then keys count


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def s3_server(*, iam: bool = False) -> Iterator[S3]:
    """moto's S3 emulator (`python -m moto.server`) in a process of its own, on a free
    loopback port: each server's buckets are its own, whoever else runs one. With `iam`,
    authentication is on once a user and its key pair exist, so a wrong key is refused as
    S3 refuses it."""
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="cnnflow-s3-"))
    env = {**os.environ}
    if iam:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_IAM_BOOTSTRAP_CALLS)
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _answers(port):  # the server's socket is up: a condition, not a delay
            assert proc.poll() is None and time.monotonic() < deadline, \
                (root / "server.log").read_text()[-3000:]
            time.sleep(0.05)
        server = S3(f"http://127.0.0.1:{port}")
        if iam:
            server = _with_iam_user(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _with_iam_user(server: S3) -> S3:
    """A user allowed everything, and the server's key pair for it."""
    import boto3

    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name=server.region,
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="cnnflow")
    key = iam.create_access_key(UserName="cnnflow")["AccessKey"]
    iam.put_user_policy(UserName="cnnflow", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    return replace(server, key=key["AccessKeyId"], secret=key["SecretAccessKey"])


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
