"""A real S3 server on loopback for the storage tests: moto's server mode, an S3
emulator (not AWS), started once per session on a free port, in its own process. boto3
and s3fs talk to it over HTTP exactly as to a bucket elsewhere; IAM authentication is
switched on, so a wrong key is refused as it would be by S3.

    s3.env          AWS_ENDPOINT_URL and a valid key pair, for os.environ or subprocesses
    s3.bucket()     a new, empty bucket's name
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

_AUTH_FREE_ACTIONS = 3  # create_user, create_access_key, put_user_policy: then keys count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    endpoint: str
    key: str
    secret: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1",
                "CNNFLOW_STORAGE_TIMEOUT_S": "5", "CNNFLOW_STORAGE_RETRIES": "2"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's server in a process of its own (`python -m moto.server`), so that its IAM
    checks (on after the first few bootstrap calls) are its own: another S3 emulator a
    test starts in this process (tests/servers.py) keeps answering without them."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_AUTH_FREE_ACTIONS)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _answers(port):  # the server's socket is up: a condition, not a delay
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="cnnflow")
        key = iam.create_access_key(UserName="cnnflow")["AccessKey"]
        iam.put_user_policy(UserName="cnnflow", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3:
    """The server, with this process's environment pointing at it."""
    from cnnflow import storage

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage._FS.clear()
    yield s3_server
    storage._FS.clear()
