"""Bad input against object storage (moto's S3 emulator on loopback, see conftest.py):
each is one line naming the URI or setting, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from cnnflow import storage
from cnnflow.config import PrepareConfig
from cnnflow.data.loader import build_loader
from cnnflow.data.manifest import verify_shards
from cnnflow.data.shards import write_shards
from cnnflow.errors import ShardError
from tests.servers import free_port


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnflow.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # cnnflow's log lines (timestamped, e.g. what a verified split cost) may precede it
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", line)]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cnnflow: error: "), proc.stderr
    return lines[0]


@pytest.fixture
def shards_uri(s3, digits_shards, tmp_path, monkeypatch) -> str:
    """The digits shard set uploaded to a new bucket."""
    monkeypatch.setenv("CNNFLOW_STORAGE_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3.bucket()}/shards"
    write_shards(digits_shards.parent / "prepared", uri, samples_per_shard=128, workers=1,
                 show_progress=False)
    return uri


def test_missing_bucket_is_named(s3, digits_shards):
    env = {**os.environ, **s3.env}
    line = one_line_error(cli("verify", "s3://no-such-bucket/shards", env=env))
    assert "no-such-bucket" in line and "does not exist" in line, line
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        write_shards(digits_shards.parent / "prepared", "s3://no-such-bucket/shards",
                     samples_per_shard=128, workers=1, show_progress=False)


def test_wrong_credentials_are_named(s3, shards_uri):
    env = {**os.environ, **s3.env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    line = one_line_error(cli("verify", shards_uri, env=env))
    assert shards_uri in line and "access denied" in line and "AWS_SECRET_ACCESS_KEY" in line


def test_endpoint_that_does_not_answer_fails_within_the_timeout(s3):
    port = free_port()  # bound, then closed: nothing listens there
    env = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "CNNFLOW_STORAGE_TIMEOUT_S": "2", "CNNFLOW_STORAGE_RETRIES": "2"}
    line = one_line_error(cli("verify", "s3://bucket/shards", env=env))  # timeout=120: no hang
    assert f"127.0.0.1:{port}" in line and "did not answer" in line, line
    assert "CNNFLOW_STORAGE_TIMEOUT_S" in line


def test_shard_deleted_after_the_manifest_is_named(s3, shards_uri):
    bucket, prefix = shards_uri[5:].split("/", 1)
    s3.client().delete_object(Bucket=bucket, Key=f"{prefix}/train-000001.tar")
    line = one_line_error(cli("verify", shards_uri, env={**os.environ, **s3.env}))
    assert f"{shards_uri}/train-000001.tar" in line and "missing" in line, line
    with pytest.raises(ShardError, match="train-000001.tar: shard listed in the manifest is "
                                         "missing"):
        build_loader(shards_uri, "train", batch_size=16)


def test_shard_changed_after_the_manifest_is_named(s3, shards_uri, tmp_path):
    bucket, prefix = shards_uri[5:].split("/", 1)
    key = f"{prefix}/train-000002.tar"
    body = bytearray(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    body[5000] ^= 0xFF  # same size, other bytes: only the sha256 tells
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(ShardError, match=r"train-000002.tar: sha256 .* does not match"):
        verify_shards(shards_uri)
    loader = build_loader(shards_uri, "train", batch_size=16)  # listing: sizes agree
    with pytest.raises(ShardError, match=r"train-000002.tar: .* changed after the manifest"):
        for _ in loader:
            pass


def test_prefix_holding_another_dataset_version_is_refused(s3, shards_uri, tmp_path):
    from cnnflow.data.prepare import prepare

    other = tmp_path / "other"
    prepare(PrepareConfig(source="synthetic", num_images=60, num_classes=3,
                          out_dir=str(other)), show_progress=False)
    bucket, prefix = shards_uri[5:].split("/", 1)
    before = {k: s3.client().head_object(Bucket=bucket, Key=k)["ETag"]
              for k in s3.keys(bucket, prefix + "/")}
    with pytest.raises(ShardError, match=r"holds shards of dataset version .*choose another "
                                         r"shard.out_dir"):
        write_shards(other, shards_uri, samples_per_shard=32, workers=1, show_progress=False)
    after = {k: s3.client().head_object(Bucket=bucket, Key=k)["ETag"]
             for k in s3.keys(bucket, prefix + "/")}
    assert after == before
    verify_shards(shards_uri)


def test_a_rerun_of_the_same_shards_publishes_nothing_new(s3, shards_uri, digits_shards):
    bucket, prefix = shards_uri[5:].split("/", 1)
    before = s3.client().head_object(Bucket=bucket, Key=f"{prefix}/manifest.json")
    write_shards(digits_shards.parent / "prepared", shards_uri, samples_per_shard=128,
                 workers=1, show_progress=False)
    after = s3.client().head_object(Bucket=bucket, Key=f"{prefix}/manifest.json")
    assert after["LastModified"] == before["LastModified"]


def test_prepare_out_dir_must_be_local(tmp_path):
    from cnnflow.data.prepare import prepare
    from cnnflow.errors import ConfigError

    with pytest.raises(ConfigError, match="prepare.out_dir: expected a local directory"):
        prepare(PrepareConfig(out_dir="s3://bucket/prepared"), show_progress=False)


def test_local_runs_never_load_an_object_storage_client(digits_shards):
    """s3fs, botocore and fsspec load only when an s3:// URI is used."""
    code = ("import sys, cnnflow.cli, cnnflow.stages, cnnflow.data.loader as L, "
            "cnnflow.train.checkpoint; from cnnflow.data.manifest import verify_shards; "
            f"verify_shards({str(digits_shards)!r}); "
            f"list(L.build_loader({str(digits_shards)!r}, 'train', batch_size=64)); "
            "print(','.join(m for m in ('s3fs', 'botocore', 'boto3', 'fsspec', 'aiobotocore') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.strip() == "", done.stdout
