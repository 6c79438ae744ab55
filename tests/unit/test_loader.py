"""build_loader: rank partition, equal batch counts, exact order, resume, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnflow.data.loader import build_loader, epoch_samples, normalize_batch
from cnnflow.data.shards import write_shards
from cnnflow.errors import ShardError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datafixtures import image_index, make_prepared  # noqa: E402


def _shards(tmp_path_factory, counts: dict[str, int], per_shard: int) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_prepared(root / "prepared", counts)
    write_shards(
        root / "prepared",
        root / "shards",
        samples_per_shard=per_shard,
        workers=2,
        show_progress=False,
    )
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """103 train samples in shards of 10 (the last one has 3): uneven on purpose."""
    return _shards(tmp_path_factory, {"train": 103, "val": 9}, 10)


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """2 shards only: fewer than 3 ranks x 2 workers."""
    return _shards(tmp_path_factory, {"train": 25}, 13)


def _epoch(root: Path, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(build_loader(root / "shards", "train", **kw))


def _indices(batches) -> list[int]:
    return [image_index(img.numpy(), chw=True) for images, _ in batches for img in images]


@pytest.mark.parametrize("fixture", ["data", "few"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_partition_the_epoch_with_equal_batch_counts(fixture, world_size, request):
    root = request.getfixturevalue(fixture)
    total = 103 if fixture == "data" else 25
    per_rank = total // world_size
    workers = 2 if fixture == "few" else 0  # 2 shards < 3 ranks x 2 workers
    seen, lengths = [], []
    for rank in range(world_size):
        loader = build_loader(
            root / "shards",
            "train",
            batch_size=4,
            rank=rank,
            world_size=world_size,
            seed=1,
            epoch=2,
            num_workers=workers,
        )
        batches = list(loader)
        assert len(batches) == len(loader) == per_rank // 4
        assert loader.samples_per_rank == per_rank
        lengths.append(len(batches))
        seen.append(_indices(batches))
    flat = [i for rank_seen in seen for i in rank_seen]
    assert len(flat) == len(set(flat)), "a sample was read twice in one epoch"
    assert set(flat) <= set(range(total))
    assert len(set(lengths)) == 1
    # Without drop_last every sample of the rank's range is read exactly once.
    everything = []
    for rank in range(world_size):
        everything += _indices(
            _epoch(
                root,
                batch_size=4,
                rank=rank,
                world_size=world_size,
                seed=1,
                epoch=2,
                drop_last=False,
            )
        )
    assert len(everything) == len(set(everything)) == per_rank * world_size


def test_epoch_plan_gives_each_rank_whole_shards():
    counts = [10] * 10 + [3]
    for rank in range(4):
        shard, _ = epoch_samples(counts, rank=rank, world_size=4, seed=0, epoch=0, shuffle=True)
        assert len(np.unique(shard)) <= 4  # 25 samples: 2 whole shards + at most 2 partial


def test_batches_hold_the_source_images_and_labels(data):
    images = np.load(data / "prepared" / "train_images.npy")
    labels = np.load(data / "prepared" / "train_labels.npy")
    batches = _epoch(data, batch_size=8, shuffle=False, drop_last=False)
    assert [len(b[0]) for b in batches] == [8] * 12 + [7]
    x, y = batches[0]
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 8, 8) and x.is_contiguous()
    assert y.dtype == torch.int64
    got = torch.cat([b[0] for b in batches]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches]).numpy(), labels)


def test_shuffle_is_reproducible_and_changes_with_epoch_and_seed(data):
    base = _indices(_epoch(data, batch_size=5, seed=0, epoch=0))
    assert base == _indices(_epoch(data, batch_size=5, seed=0, epoch=0))
    assert base != _indices(_epoch(data, batch_size=5, seed=0, epoch=1))
    assert base != _indices(_epoch(data, batch_size=5, seed=1, epoch=0))
    assert base != sorted(base)


def test_set_epoch_matches_a_fresh_loader(data):
    loader = build_loader(data / "shards", "train", batch_size=5, seed=3)
    loader.set_epoch(4)
    assert _indices(loader) == _indices(_epoch(data, batch_size=5, seed=3, epoch=4))


def test_workers_do_not_change_the_batches(data):
    kw = dict(batch_size=6, rank=1, world_size=2, seed=5, epoch=1)
    serial = _epoch(data, num_workers=0, **kw)
    parallel = _epoch(data, num_workers=2, **kw)
    assert len(serial) == len(parallel) == 51 // 6
    for (xa, ya), (xb, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_start_batch_resumes_exactly_at_the_tail(data, workers):
    full = _epoch(data, batch_size=4, seed=2, epoch=3)
    tail = _epoch(data, batch_size=4, seed=2, epoch=3, start_batch=7, num_workers=workers)
    assert len(tail) == len(full) - 7
    for (xa, ya), (xb, yb) in zip(full[7:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_file_uri_and_manifest_attribute(data):
    loader = build_loader(f"file://{data / 'shards'}", "val", batch_size=3, shuffle=False)
    assert loader.manifest["splits"]["val"]["samples"] == 9
    assert len(loader) == 3 and sum(len(x) for x, _ in loader) == 9


def test_version_mismatch_names_both_versions(data):
    version = build_loader(data / "shards", "train", batch_size=4).manifest["dataset_version"]
    assert build_loader(data / "shards", "train", batch_size=4, expected_version=version)
    with pytest.raises(ShardError, match=rf"{version[:12]}.*expected {'f' * 12}"):
        build_loader(data / "shards", "train", batch_size=4, expected_version="f" * 64)


def test_more_ranks_than_samples(data):
    with pytest.raises(ShardError, match=r"split 'val' has 9 samples, too few for world size 10"):
        build_loader(data / "shards", "val", batch_size=1, rank=0, world_size=10)


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(data / "shards", "train", batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        build_loader(data / "shards", "train", batch_size=1, rank=2, world_size=2)
    with pytest.raises(ShardError, match="no split 'nope'"):
        build_loader(data / "shards", "nope", batch_size=1)


def test_damaged_shard_is_refused_at_build(tmp_path_factory):
    root = _shards(tmp_path_factory, {"train": 20}, 10)
    path = root / "shards" / "train-000000.tar"
    data = bytearray(path.read_bytes())
    data[1500] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000000\.tar: sha256"):
        build_loader(root / "shards", "train", batch_size=2)


def test_normalize_batch_per_channel():
    images = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    images[:, 1] = 0
    out = normalize_batch(images, mean=[0.5, 0.5, 1.0], std=[0.5, 0.25, 2.0])
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.allclose(out[:, 0], torch.tensor(1.0))
    assert torch.allclose(out[:, 1], torch.tensor(-2.0))
    assert torch.allclose(out[:, 2], torch.tensor(0.0))
