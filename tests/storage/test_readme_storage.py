"""The README's "Storage on a cluster" commands, as written there, against an S3 emulator
(moto's server mode) on loopback, its buckets made by the README's boto3 line:

- `cnnflow shard`, `cnnflow verify` and `cnnflow train` on s3://cnnflow-data/..., in a
  workspace whose params.yaml trains one epoch;
- a DVC remote in the bucket: `dvc remote add -d storage s3://...` and `dvc remote modify
  storage endpointurl ...`, then `dvc push` and `dvc pull` with the real dvc command line
  (dvc-s3), in a temporary git repository (identity set here).

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), as on
a developer's machine or in CI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.servers import s3_server

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "cnnflow-data"


def _readme_line(start: str) -> str:
    return next(line.strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.strip().startswith(start))


@pytest.fixture(scope="module")
def readme_s3():
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


def test_push_then_pull_from_a_fresh_clone(readme_s3, tmp_path):
    s3 = readme_s3
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


def test_shard_verify_and_train_on_the_bucket_as_the_readme_writes_them(readme_s3, tmp_path):
    s3 = readme_s3
    ws = tmp_path / "ws"
    shutil.copytree(ROOT / "data" / "raw" / "digits", ws / "data" / "raw" / "digits")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["epochs"] = 1  # the user's params.yaml: one epoch, one process
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "CNNFLOW_", "KFP_"))}
    env.update({**s3.env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"})
    _run([str(BIN / "cnnflow"), "prepare"], ws, env)
    dataset = json.loads((ws / "data" / "prepared" / "dataset.json").read_text())

    shard, verify, train = (_readme_line(f"cnnflow {c}") for c in (
        "shard --set shard.out_dir=s3://", "verify s3://", "train --set train.shards=s3://"))
    assert shard == "cnnflow shard --set shard.out_dir=s3://cnnflow-data/shards"
    _run(["bash", "-c", shard], ws, env)
    manifest = json.loads(s3.client().get_object(Bucket=BUCKET, Key="shards/manifest.json")[
        "Body"].read())
    assert manifest["dataset_version"] == dataset["version"]
    tars = sorted(k for k in s3.keys(BUCKET, "shards/") if k.endswith(".tar"))
    assert tars == sorted(f"shards/{e['name']}" for split in manifest["splits"].values()
                          for e in split["shards"])
    assert not (ws / "data" / "shards").exists()  # nothing on local disk

    verified = _run(["bash", "-c", verify], ws, env).stdout.strip().splitlines()
    counts = {s: dataset["splits"][s]["count"] for s in ("train", "val", "test")}
    in_manifest = {s: v["samples"] for s, v in manifest["splits"].items()}
    assert in_manifest == counts
    assert verified[-1] == (f"verified s3://{BUCKET}/shards: dataset "
                            f"{dataset['version'][:12]}, samples {json.dumps(in_manifest)}")

    trained = _run(["bash", "-c", train], ws, env).stdout.strip().splitlines()
    keys = s3.keys(BUCKET, "model/")
    assert {"model/_SUCCESS", "model/model.pt", "model/summary.json"} <= set(keys), keys
    summary = json.loads(s3.client().get_object(Bucket=BUCKET, Key="model/summary.json")[
        "Body"].read())
    steps_per_epoch = counts["train"] // params["train"]["batch_size"]
    assert summary["steps"] == steps_per_epoch
    assert trained[-1].startswith(f"trained {steps_per_epoch} steps -> "
                                  f"s3://{BUCKET}/model/model.pt"), trained
    final = f"ckpt/step-{steps_per_epoch:08d}.done"
    assert final in s3.keys(BUCKET, "ckpt/")  # the last checkpoint, committed
    assert not (ws / "s3:").exists() and not (ws / "outputs").exists()
