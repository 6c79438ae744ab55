"""A DVC remote in a bucket: the README's `dvc remote add -d storage s3://...` and
`dvc remote modify storage endpointurl ...`, then `dvc push` and `dvc pull` with the real
dvc command line (dvc-s3) against an S3 emulator (moto's server mode) on loopback, in a
temporary git repository (identity set here). Credentials come from the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), as on a developer's machine or in CI."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import s3_server

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "cnnflow-data"


def _readme_line(start: str) -> str:
    return next(line.strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.strip().startswith(start))


@pytest.fixture(scope="module")
def s3():
    """The S3 emulator, with the README's buckets made by the README's command."""
    with s3_server() as server:
        command = _readme_line('python -c "import boto3;')
        env = {**os.environ, **server.env}
        proc = subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} ",
                                                             1)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        buckets = server.client().list_buckets()["Buckets"]
        assert sorted(b["Name"] for b in buckets) == ["cnnflow-data", "cnnflow-mlflow"]
        yield server


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_push_then_pull_from_a_fresh_clone(s3, tmp_path):
    # the endpoint only in the remote's config: nothing in the environment names it
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "DVC_", "CNNFLOW_"))}
    env.update({k: v for k, v in s3.env.items() if k.startswith("AWS_") and "ENDPOINT" not in k})
    env.update({"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "DVC_NO_ANALYTICS": "1",
                "GIT_AUTHOR_NAME": "cnnflow-test", "GIT_AUTHOR_EMAIL": "test@cnnflow.invalid",
                "GIT_COMMITTER_NAME": "cnnflow-test",
                "GIT_COMMITTER_EMAIL": "test@cnnflow.invalid"})
    dvc = str(BIN / "dvc")
    work = tmp_path / "work"
    (work / "data" / "raw").mkdir(parents=True)
    images = {f"{i}.bin": os.urandom(2048 + i) for i in range(3)}
    for name, blob in images.items():
        (work / "data" / "raw" / name).write_bytes(blob)
    _run(["git", "init", "-q", "-b", "main"], work, env)
    _run([dvc, "init", "-q"], work, env)
    # the README's two commands, the emulator's address for its example endpoint
    add = _readme_line("dvc remote add -d storage s3://").split()
    assert add[-1] == f"s3://{BUCKET}/dvcstore"
    _run([dvc, *add[1:]], work, env)
    modify = _readme_line("dvc remote modify storage endpointurl").split()
    _run([dvc, *modify[1:-1], s3.endpoint], work, env)
    _run([dvc, "add", "-q", "data/raw"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "raw data on the remote"], work, env)
    pushed = _run([dvc, "push"], work, env)
    assert "4 files pushed" in pushed.stdout, pushed.stdout  # 3 files + the .dir listing
    keys = s3.keys(BUCKET, "dvcstore/")
    for blob in images.values():
        md5 = hashlib.md5(blob).hexdigest()
        assert f"dvcstore/files/md5/{md5[:2]}/{md5[2:]}" in keys
    assert len(keys) == 4

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    assert not (clone / "data" / "raw").exists()
    pulled = _run([dvc, "pull"], clone, env)
    assert "3 files added" in pulled.stdout, pulled.stdout
    got = {p.name: p.read_bytes() for p in (clone / "data" / "raw").iterdir()}
    assert got == images
    # and the remote is what it came from: the clone had no cache of its own
    shutil.rmtree(clone / ".dvc" / "cache")
    (clone / "data" / "raw" / "0.bin").unlink()
    _run([dvc, "pull"], clone, env)
    assert (clone / "data" / "raw" / "0.bin").read_bytes() == images["0.bin"]
