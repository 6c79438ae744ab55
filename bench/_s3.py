"""A loopback S3 server for the benchmarks: moto's server mode (an S3 emulator, the dev
extra's `moto[server]`) in a process of its own, with this process's environment pointed
at it.

    with s3_server() as bucket:      # AWS_ENDPOINT_URL etc. set while inside
        write_shards(prepared, f"s3://{bucket}/shards", ...)

Not a benchmark itself; loopback numbers measure cnnflow's client path (requests, copies,
checksums) and the emulator's own serving, not a real bucket's network. The server runs
in its own process so that its Python work does not share the client's interpreter lock
(a bucket's servers are elsewhere too); on a 2-core machine it still shares the cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def s3_server() -> Iterator[str]:
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not _answers(port):  # the socket is up: a condition, not a delay
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"moto server did not start: {log.read()[-2000:]!r}")
                time.sleep(0.05)
            os.environ.update(env)
            boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(
                Bucket="bench")
            yield "bench"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
