"""write_shards / verify_shards: content, reproducibility, atomicity, damage detection."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from cnnflow.data import shards
from cnnflow.data.manifest import verify_shards
from cnnflow.data.shards import write_shards
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
        [".cnnflow-owner.json", "manifest.json"]
        + [s["name"] for sp in manifest["splits"].values() for s in sp["shards"]]
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


@pytest.mark.parametrize("count, pixels", [(0, 48), (30, 48), (3, 3 << 20)])
def test_fast_writer_matches_webdataset_tarwriter_byte_for_byte(count, pixels):
    # 3 MiB images: the writer's 4 MiB flush falls inside the archive, not only at close
    header = shards.npy_header((pixels // 3, 1, 3))
    samples = [
        {"__key__": f"train-{i:08d}", "npy": header + bytes([i]) * (pixels + i % 5),
         "cls": b"%d" % (i * 37), "__url__": "ignored"}
        for i in range(count)
    ]
    fast, plain = io.BytesIO(), io.BytesIO()
    with shards.TarShardWriter(fast) as writer:
        sizes = [writer.write(sample) for sample in samples]
    with wds.TarWriter(plain, user="", group="", mode=0o644, mtime=0, encoder=False) as writer:
        assert [writer.write(sample) for sample in samples] == sizes
    assert fast.getvalue() == plain.getvalue()


def test_long_member_names_take_tarfiles_ustar_header():
    key = "d" * 60 + "/" + "k" * 60
    buf = io.BytesIO()
    with shards.TarShardWriter(buf) as writer:
        writer.write({"__key__": key, "cls": b"7"})
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        assert [(m.name, m.size) for m in tar] == [(f"{key}.cls", 1)]


def test_sharding_and_verifying_import_neither_torch_nor_webdataset(prepared, tmp_path):
    # importing webdataset imports torch (~2 s): the shard stage and `cnnflow verify` must not
    code = (
        "import sys\n"
        "from cnnflow.data.manifest import verify_shards\n"
        "from cnnflow.data.shards import write_shards\n"
        "import cnnflow.stages\n"
        f"write_shards({str(prepared)!r}, {str(tmp_path / 'out')!r}, samples_per_shard=20, "
        "workers=1, show_progress=False)\n"
        f"verify_shards({str(tmp_path / 'out')!r})\n"
        "print(sorted({'torch', 'webdataset'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
    with pytest.raises(ShardError, match="unsupported URI scheme 'ftp'; use a local path, "
                                         "file:// or one of s3"):
        verify_shards("ftp://host/shards")


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
        ".cnnflow-owner.json",
        "manifest.json",
        "test-000000.tar",
        "train-000000.tar",
        "val-000000.tar",
    ]
    assert verify_shards(out) == manifest


def test_missing_dataset_json_is_a_shard_error(tmp_path):
    with pytest.raises(ShardError, match=r"dataset\.json: not found"):
        write_shards(tmp_path, tmp_path / "out", samples_per_shard=10, show_progress=False)
