"""The loader and checkpoints on object storage (moto's S3 emulator on loopback, see
conftest.py): the same batches as from local disk, resume mid-epoch, a bounded cache,
retries with backoff, and DCP checkpoints published by a marker."""

from __future__ import annotations

import pytest
import torch

from cnnflow import storage
from cnnflow.data.loader import build_loader
from cnnflow.data.shards import write_shards
from cnnflow.train.checkpoint import Checkpointer


@pytest.fixture
def shards_uri(s3, digits_shards, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("CNNFLOW_STORAGE_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3.bucket()}/shards"
    write_shards(digits_shards.parent / "prepared", uri, samples_per_shard=128, workers=1,
                 show_progress=False)
    return uri


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def same(a, b) -> None:
    assert len(a) == len(b) and len(a) > 0
    for (x, y), (u, v) in zip(a, b, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_each_rank_streams_the_local_batches_and_only_its_shards(s3, shards_uri,
                                                                 digits_shards, tmp_path):
    for rank in (0, 1):
        remote = build_loader(shards_uri, "train", batch_size=16, rank=rank, world_size=2,
                              epoch=1)
        local = build_loader(digits_shards, "train", batch_size=16, rank=rank, world_size=2,
                             epoch=1)
        assert len(remote) == len(local)  # equal batches on every rank
        same(batches(remote), batches(local))
    cached = sorted(p.name for p in (tmp_path / "cache" / "shards").glob("*.tar"))
    manifest = remote.manifest["splits"]["train"]["shards"]
    assert len(cached) <= len(manifest)
    assert set(cached) <= {f"{e['sha256']}.tar" for e in manifest}


def test_resume_mid_epoch_and_workers_give_the_same_batches(s3, shards_uri, digits_shards):
    full = batches(build_loader(digits_shards, "train", batch_size=32, epoch=2))
    resumed = build_loader(shards_uri, "train", batch_size=32, epoch=2, start_batch=5,
                           num_workers=2)
    same(batches(resumed), full[5:])


def test_cache_stays_within_its_bound(s3, shards_uri, digits_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNFLOW_STORAGE_CACHE_DIR", str(tmp_path / "small"))
    monkeypatch.setenv("CNNFLOW_STORAGE_CACHE_BYTES", "1")  # keeps only the shard in use
    loader = build_loader(shards_uri, "train", batch_size=32, epoch=0)
    same(batches(loader), batches(build_loader(digits_shards, "train", batch_size=32)))
    assert len(list((tmp_path / "small" / "shards").glob("*.tar"))) == 1


def test_transient_errors_are_retried_with_backoff_then_named(monkeypatch):
    monkeypatch.setenv("CNNFLOW_STORAGE_RETRIES", "3")
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    assert storage.call("s3://b/k", flaky) == b"ok" and len(calls) == 3

    def failing(exc):
        def fn():
            calls.append(1)
            raise exc
        return fn

    calls.clear()
    with pytest.raises(storage.StorageError, match="s3://b/k: ConnectionResetError"):
        storage.call("s3://b/k", failing(ConnectionResetError("connection reset by peer")))
    assert len(calls) == 3  # bounded
    calls.clear()
    with pytest.raises(storage.StorageError, match="s3://b/k: access denied"):
        storage.call("s3://b/k", failing(PermissionError("AccessDenied")))
    assert len(calls) == 1  # not transient: no retry


def test_dcp_checkpoint_is_complete_only_once_marked(s3, tmp_path):
    import torch.distributed as dist

    bucket = s3.bucket()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        store = Checkpointer(f"s3://{bucket}/ckpt", keep=1)
        state = {"model": {"w": torch.arange(6.0)}}
        store.save_sharded(4, state, {"state": {"step": 4}}, main=True)
        store.save_sharded(8, {"model": {"w": torch.arange(6.0) * 2}}, {"state": {"step": 8}},
                           main=True)
        keys = s3.keys(bucket, "ckpt/")
        assert "ckpt/step-00000008.done" in keys and "ckpt/step-00000008/meta.pt" in keys
        assert not [k for k in keys if "00000004" in k], keys  # pruned, marker first
        latest = store.latest()
        assert latest == f"s3://{bucket}/ckpt/step-00000008"
        assert store.load(latest)["state"]["step"] == 8
        into = {"model": {"w": torch.zeros(6)}}
        store.load_sharded(latest, into)
        assert torch.equal(into["model"]["w"], torch.arange(6.0) * 2)
        s3.client().delete_object(Bucket=bucket, Key="ckpt/step-00000008.done")
        assert store.latest() is None  # objects without a marker are not a checkpoint
    finally:
        dist.destroy_process_group()


def test_prepare_reads_its_source_from_a_bucket(s3, tmp_path, monkeypatch):
    """prepare.path = s3://bucket/raw: the same data set (version) as from a local copy,
    and dataset.json names the URI."""
    import json

    import numpy as np
    from PIL import Image

    from cnnflow.config import PrepareConfig
    from cnnflow.data.prepare import prepare

    monkeypatch.setenv("CNNFLOW_STORAGE_CACHE_DIR", str(tmp_path / "cache"))
    raw, bucket = tmp_path / "raw", s3.bucket()
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (raw / cls).mkdir(parents=True)
        for i in range(10):
            path = raw / cls / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
            s3.client().upload_file(str(path), bucket, f"raw/{cls}/{i}.png")
    cfg = {"source": "imagefolder", "height": 8, "width": 8, "workers": 1}
    local = prepare(PrepareConfig(path=str(raw), out_dir=str(tmp_path / "a"), **cfg),
                    show_progress=False)
    remote = prepare(PrepareConfig(path=f"s3://{bucket}/raw", out_dir=str(tmp_path / "b"),
                                   **cfg), show_progress=False)
    assert remote["version"] == local["version"]
    meta = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert meta["params"]["path"] == f"s3://{bucket}/raw"
