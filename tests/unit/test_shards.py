"""write_shards / verify_shards: content, reproducibility, atomicity, damage detection."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from cnnflow.data import shards
from cnnflow.data.shards import verify_shards, write_shards
from cnnflow.errors import ShardError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datafixtures import make_prepared  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"), {"train": 53, "val": 7, "test": 5})


@pytest.fixture()
def written(prepared, tmp_path):
    out = tmp_path / "shards"
    manifest = write_shards(prepared, out, samples_per_shard=10, workers=2, show_progress=False)
    return out, manifest


def test_manifest_lists_every_shard_with_counts_and_metadata(prepared, written):
    out, manifest = written
    meta = json.loads((prepared / "dataset.json").read_text())
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["dataset_version"] == meta["version"]
    assert manifest["image_shape"] == [8, 8, 3] and manifest["classes"] == meta["classes"]
    assert manifest["normalize"] == meta["normalize"]
    train = manifest["splits"]["train"]
    assert [s["name"] for s in train["shards"]] == [f"train-{i:06d}.tar" for i in range(6)]
    assert [s["samples"] for s in train["shards"]] == [10] * 5 + [3]
    assert train["samples"] == 53 and manifest["splits"]["test"]["samples"] == 5
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for sp in manifest["splits"].values() for s in sp["shards"]]
    )


def test_plain_webdataset_reader_gets_the_source_arrays_back(prepared, written):
    out, _ = written
    images = np.load(prepared / "train_images.npy")
    labels = np.load(prepared / "train_labels.npy")
    urls = [str(p) for p in sorted(out.glob("train-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"train-{i:08d}" for i in range(53)]
    for i, sample in enumerate(samples):
        np.testing.assert_array_equal(sample["npy"], images[i])
        assert sample["cls"] == labels[i]


def test_same_input_gives_byte_identical_shards(prepared, tmp_path):
    a = write_shards(prepared, tmp_path / "a", samples_per_shard=7, workers=1, show_progress=False)
    b = write_shards(prepared, tmp_path / "b", samples_per_shard=7, workers=2, show_progress=False)
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_fast_writer_matches_webdataset_tarwriter_byte_for_byte():
    header = shards.npy_header((4, 4, 3))
    samples = [
        {"__key__": f"train-{i:08d}", "npy": header + bytes([i]) * 48, "cls": b"%d" % (i * 37)}
        for i in range(30)
    ]
    fast, plain = io.BytesIO(), io.BytesIO()
    with shards._writer_class()(fast) as writer:
        for sample in samples:
            writer.write(sample)
    with wds.TarWriter(plain, user="", group="", mode=0o644, mtime=0, encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    assert fast.getvalue() == plain.getvalue()


def test_verify_passes_on_good_shards(written):
    out, manifest = written
    assert verify_shards(out) == manifest
    assert verify_shards(f"file://{out}", splits=["val"]) == manifest


def _first_shard(out: Path) -> Path:
    return out / "train-000001.tar"


def test_flipped_byte_is_named_by_file(written):
    out, _ = written
    path = _first_shard(out)
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    expected = r"train-000001\.tar: sha256 \w+… does not match .*\(expected \w+…\)"
    with pytest.raises(ShardError, match=expected):
        verify_shards(out)


def test_truncated_shard(written):
    out, _ = written
    path = _first_shard(out)
    path.write_bytes(path.read_bytes()[:-1024])
    with pytest.raises(ShardError, match=r"train-000001\.tar: size \d+ bytes .*expected \d+"):
        verify_shards(out)


def test_missing_shard(written):
    out, _ = written
    _first_shard(out).unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar: .*missing"):
        verify_shards(out)


def test_sample_count_mismatch(written):
    out, manifest = written
    manifest["splits"]["val"]["shards"][0]["samples"] = 6
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"val-000000\.tar: 7 samples found, .*expects 6"):
        verify_shards(out)


def test_missing_and_invalid_manifest(written, tmp_path):
    out, _ = written
    with pytest.raises(ShardError, match=r"empty/manifest\.json: manifest not found"):
        verify_shards(tmp_path / "empty")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"shards/manifest\.json: not a valid manifest"):
        verify_shards(out)
    (out / "manifest.json").write_text(json.dumps({"format": 1, "splits": {}}))
    with pytest.raises(ShardError, match=r"manifest\.json: invalid manifest: missing key"):
        verify_shards(out)


def test_unsupported_uri_scheme():
    with pytest.raises(ShardError, match="unsupported URI scheme 's3'"):
        verify_shards("s3://bucket/shards")


def test_failed_rewrite_leaves_the_old_shards_intact(prepared, written, monkeypatch):
    out, manifest = written
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shards, "_manifest", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_shards(prepared, out, samples_per_shard=3, workers=1, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["shards"]  # no temp dirs left
    assert verify_shards(out) == manifest


def test_rewrite_replaces_old_shards(prepared, written):
    out, _ = written
    manifest = write_shards(prepared, out, samples_per_shard=100, workers=2, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "test-000000.tar",
        "train-000000.tar",
        "val-000000.tar",
    ]
    assert verify_shards(out) == manifest


def test_missing_dataset_json_is_a_shard_error(tmp_path):
    with pytest.raises(ShardError, match=r"dataset\.json: not found"):
        write_shards(tmp_path, tmp_path / "out", samples_per_shard=10, show_progress=False)
