"""The pipeline against real servers: an S3 emulator (moto's server mode on loopback, see
conftest.py) and PostgreSQL (tests/servers.py), with `cnnflow mlflow-server` on that
database and its artifacts in the bucket. prepare -> shard to s3 -> verify -> 2-process
torchrun streaming from s3 with checkpoints to s3, tracked in that server -> evaluate
the model from s3, which registers it there; and a SIGKILLed worker resumes from the s3
checkpoint to the very weights of the uninterrupted run."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from cnnflow.config import load_params, to_dict
from tests.servers import MlflowServer, postgres_server

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# tracking off for the interrupted run, on (the PostgreSQL-backed server) for the other
TRAIN = ["train.max_steps=48", "train.epochs=2", "tracking.enabled=false",
         "checkpoint.every_steps=4", "model.width=8", "model.dropout=0", "train.log_every=4",
         "train.batch_size=32", "evaluate.promote=false"]


def cli(*args: str, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnflow.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def _ok(proc) -> None:
    assert proc.returncode == 0, (proc.stdout or "")[-3000:] + (proc.stderr or "")[-6000:]


def torchrun(params, env, *extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra, "--nproc_per_node=2",
            "-m", "cnnflow.train", "--params", str(params)]


def params_file(path, bucket, name, work, *tracking: str) -> str:
    overrides = [f"train.shards=s3://{bucket}/shards",
                 f"checkpoint.dir=s3://{bucket}/{name}-ckpt",
                 f"train.out_dir=s3://{bucket}/{name}-model", f"prepare.out_dir={work}/prepared",
                 f"evaluate.out_dir={work}/{name}-reports", *TRAIN, *tracking]
    path.write_text(yaml.safe_dump(to_dict(load_params(None, overrides)), sort_keys=False))
    return str(path)


def model_weights(s3, bucket, name) -> dict:
    keys = s3.keys(bucket, f"{name}-model/")
    assert f"{name}-model/_SUCCESS" in keys and f"{name}-model/model.pt" in keys, keys
    body = s3.client().get_object(Bucket=bucket, Key=f"{name}-model/model.pt")["Body"].read()
    return torch.load(io.BytesIO(body), weights_only=True)


@pytest.fixture
def mlflow_on_postgres(s3, tmp_path):
    """`cnnflow mlflow-server --store postgresql://... --artifacts s3://B/mlflow`, as the
    README's "Storage on a cluster" runs it; (server, database, bucket)."""
    bucket = s3.bucket()
    with postgres_server() as pg:
        pg.create_database("mlflow")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        server = MlflowServer(["--store", f"postgresql://{pg.user}@127.0.0.1:{pg.port}/mlflow",
                               "--artifacts", f"s3://{bucket}/mlflow"],
                              {**env, **s3.env, "PGPASSWORD": pg.password}, tmp_path)
        try:
            yield server, pg, bucket
        finally:
            server.stop()


@pytest.mark.timeout(900)
def test_pipeline_on_s3_and_resume_after_sigkill(s3, mlflow_on_postgres, tmp_path):
    server, pg, bucket = mlflow_on_postgres
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "CNNFLOW_STORAGE_CACHE_DIR": str(tmp_path / "cache")}
    work = tmp_path
    off = ("--set", "tracking.enabled=false")
    _ok(cli("prepare", *off, "--set", f"prepare.out_dir={work}/prepared", env=env, cwd=work))
    shard = cli("shard", *off, "--set", f"prepare.out_dir={work}/prepared", "--set",
                f"shard.out_dir=s3://{bucket}/shards", "--set", "shard.samples_per_shard=128",
                env=env, cwd=work)
    _ok(shard)
    keys = s3.keys(bucket, "shards/")
    assert "shards/manifest.json" in keys and "shards/train-000000.tar" in keys, keys
    verified = cli("verify", f"s3://{bucket}/shards", env=env, cwd=work)
    _ok(verified)
    assert f"verified s3://{bucket}/shards" in verified.stdout

    tracked = ("tracking.enabled=true", f"tracking.uri={server.url}")
    ref = params_file(tmp_path / "ref.yaml", bucket, "ref", work, *tracked)
    server.wait_ready()
    _ok(subprocess.run(torchrun(ref, env, "--standalone"), cwd=work, env=env,
                       capture_output=True, text=True, timeout=240))
    assert "ref-ckpt/step-00000048.done" in s3.keys(bucket, "ref-ckpt/")

    killed = params_file(tmp_path / "k.yaml", bucket, "k", work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            torchrun(killed, env, "--nnodes=1:1", "--max-restarts=1", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint=127.0.0.1:{port}", "--monitor-interval=0.5"),
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        # the first complete checkpoint while the job runs (older ones are rotated away)
        deadline = time.time() + 180  # a hang guard; the loop waits for the condition
        while proc.poll() is None and time.time() < deadline and not any(
                k.endswith(".done") for k in s3.keys(bucket, "k-ckpt/")):
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before a worker could be killed"
        assert any(k.endswith(".done") for k in s3.keys(bucket, "k-ckpt/")), \
            log_path.read_text()
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "cnnflow.train" in " ".join(c.cmdline())]
        assert len(workers) == 2, [w.cmdline() for w in workers]
        workers[1].send_signal(signal.SIGKILL)
        assert proc.wait(240) == 0, log_path.read_text()[-5000:]
    text = log_path.read_text()
    assert "resumed from s3://" in text, text[-5000:]

    a, b = model_weights(s3, bucket, "ref"), model_weights(s3, bucket, "k")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # the model comes back through the server: moto's IAM mode refuses the presigned URLs
    # of MLflow's direct multipart download, which a real bucket accepts
    evaluated = cli("evaluate", "--params", ref, cwd=work,
                    env={**env, "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"})
    _ok(evaluated)
    metrics = json.loads((work / "ref-reports" / "metrics.json").read_text())
    assert metrics["test.n"] == 179 and 0.0 <= metrics["test.accuracy"] <= 1.0, metrics
    evaluation = json.loads((work / "ref-reports" / "evaluation.json").read_text())
    assert evaluation["model"] == f"s3://{bucket}/ref-model"  # not the local copy it read
    # registered in the server: the version in PostgreSQL, its model's files in the bucket
    from mlflow import MlflowClient

    version = MlflowClient(server.url).get_model_version_by_alias("cnnflow", "challenger")
    assert version.version == "1" and version.status == "READY"
    conn = pg.connect("mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT name, version, source FROM model_versions")
            rows = cur.fetchall()
    finally:
        conn.close()
    assert rows == [("cnnflow", 1, version.source)], rows
    logged = [k for k in s3.keys(bucket, "mlflow/") if k.endswith("/MLmodel")]
    assert logged, s3.keys(bucket, "mlflow/")
    # the s3:// outputs left nothing on local disk where the jobs ran
    assert not (work / "s3:").exists(), sorted(p.name for p in work.iterdir())
