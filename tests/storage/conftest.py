"""A real S3 server on loopback for the storage tests: moto's server mode, an S3
emulator (not AWS), started once per session on a free port, in its own process (see
tests/servers.py). boto3 and s3fs talk to it over HTTP exactly as to a bucket elsewhere;
IAM authentication is switched on, so a wrong key is refused as it would be by S3.

    s3.env          AWS_ENDPOINT_URL and a valid key pair, for os.environ or subprocesses
    s3.bucket()     a new, empty bucket's name
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.servers import S3
from tests.servers import s3_server as start_s3_server

# short timeouts and few retries: a fault in a test shows in seconds
_STORAGE_ENV = {"CNNFLOW_STORAGE_TIMEOUT_S": "5", "CNNFLOW_STORAGE_RETRIES": "2"}


@pytest.fixture(scope="session")
def s3_server():
    with start_s3_server(iam=True) as server:
        yield replace(server, extra_env=_STORAGE_ENV)


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
