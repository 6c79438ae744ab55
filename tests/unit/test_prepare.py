"""prepare: split rule, stats, version, output files, atomic replacement, load_prepared."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from cnnflow.config import PrepareConfig
from cnnflow.data.prepare import (
    SPLITS,
    dataset_version,
    load_prepared,
    prepare,
    split_assignment,
)
from cnnflow.errors import ConfigError, DataError


def run(tmp_path: Path, name: str = "out", **kw) -> dict:
    return prepare(PrepareConfig(out_dir=str(tmp_path / name), **kw), show_progress=False)


def error_of(exc_type, func) -> str:
    with pytest.raises(exc_type) as info:
        func()
    assert "\n" not in str(info.value)
    return str(info.value)


def write_indexed_idx(directory: Path, labels: list[int]) -> None:
    """IDX files whose image i stores i in its first two pixels (little end first)."""
    n = len(labels)
    images = np.zeros((n, 2, 2), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    for kind, magic, array in (("images", 0x803, images), ("labels", 0x801, np.array(labels))):
        header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
        path = directory / f"set-{kind}-idx{array.ndim}-ubyte"
        path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_digits_output_contract(tmp_path):
    meta = run(tmp_path)
    out = tmp_path / "out"
    text = (out / "dataset.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == meta
    assert text == json.dumps(meta, sort_keys=True, indent=2) + "\n"
    assert len(meta["version"]) == 64 and int(meta["version"], 16) >= 0
    assert meta["image_shape"] == [8, 8, 1] and meta["source"] == "digits"
    assert "out_dir" not in meta["params"] and "workers" not in meta["params"]
    total = 0
    for split in SPLITS:
        images = np.load(out / f"{split}_images.npy")
        labels = np.load(out / f"{split}_labels.npy")
        assert images.dtype == np.uint8 and images.shape == (len(labels), 8, 8, 1)
        assert labels.dtype == np.int64
        assert meta["splits"][split]["count"] == len(labels)
        assert meta["splits"][split]["per_class"] == np.bincount(labels, minlength=10).tolist()
        total += len(labels)
    assert total == 1797
    assert dataset_version(out) == meta["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_same_input_same_bytes_other_seed_other_version(tmp_path):
    first = run(tmp_path, "a")
    second = run(tmp_path, "b")
    assert first == second
    for name in ["dataset.json"] + [f"{s}_{k}.npy" for s in SPLITS for k in ("images", "labels")]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = run(tmp_path, "c", seed=1)
    assert other["version"] != first["version"]
    assert other["splits"]["train"]["per_class"] == first["splits"]["train"]["per_class"]


def test_stratified_counts_follow_round_half_up(tmp_path):
    labels = [0] * 10 + [1] * 7 + [2] * 25
    write_indexed_idx(tmp_path, labels)
    meta = run(
        tmp_path, path=str(tmp_path), source="idx", train_ratio=0.7, val_ratio=0.15, test_ratio=0.15
    )
    # n=10: 7 | round(8.5)=9 -> 2 | 1;  n=7: round(4.9)=5 | round(5.95)=6 -> 1 | 1
    # n=25: round(17.5)=18 | round(21.25)=21 -> 3 | 4
    assert meta["splits"]["train"]["per_class"] == [7, 5, 18]
    assert meta["splits"]["val"]["per_class"] == [2, 1, 3]
    assert meta["splits"]["test"]["per_class"] == [1, 1, 4]


def test_splits_partition_in_ascending_original_order(tmp_path):
    labels = (np.arange(300) * 7 % 4).tolist()
    write_indexed_idx(tmp_path, labels)
    run(tmp_path, path=str(tmp_path), source="idx", seed=5)
    ds = load_prepared(tmp_path / "out")
    seen = []
    for split in SPLITS:
        images = ds.images(split).astype(np.int64)
        index = images[:, 0, 0, 0] + 256 * images[:, 0, 1, 0]
        assert np.all(np.diff(index) > 0)
        assert np.array_equal(np.asarray(ds.labels(split)), np.array(labels)[index])
        seen.append(index)
    assert sorted(np.concatenate(seen).tolist()) == list(range(300))


def test_normalisation_from_train_only(tmp_path):
    meta = run(tmp_path)
    ds = load_prepared(tmp_path / "out")
    train = np.asarray(ds.images("train"), dtype=np.float64) / 255
    assert meta["normalize"]["mean"] == pytest.approx([train.mean()], rel=1e-12)
    assert meta["normalize"]["std"] == pytest.approx([train.std()], rel=1e-12)
    everything = np.concatenate([np.asarray(ds.images(s)) for s in SPLITS]) / 255
    assert meta["normalize"]["mean"][0] != pytest.approx(everything.mean(), rel=1e-9)
    assert all(isinstance(v, float) and math.isfinite(v) for v in meta["normalize"]["std"])


def test_synthetic_version_does_not_depend_on_workers(tmp_path):
    options = dict(source="synthetic", num_images=1000, height=128, width=96, num_classes=3)
    one = run(tmp_path, "one", workers=1, **options)
    two = run(tmp_path, "two", workers=2, **options)
    assert one == two
    assert one["image_shape"] == [128, 96, 3] and len(one["normalize"]["mean"]) == 3
    assert one["params"]["num_images"] == 1000 and one["classes"] == ["0", "1", "2"]
    assert run(tmp_path, "other", workers=1, seed=1, **options)["version"] != one["version"]


def test_class_too_small_for_a_split_names_class_and_split():
    labels = np.array([0] * 20 + [1] * 3)
    # n=3 at 0.8/0.1/0.1: cuts round(2.4)=2, round(2.7)=3 -> test gets nothing
    cfg = PrepareConfig()
    message = error_of(DataError, lambda: split_assignment(labels, ["0", "1"], cfg))
    assert "class '1'" in message and "'test'" in message
    # n=3 at 0.7/0.1/0.2: cuts round(2.1)=2, round(2.4)=2 -> val gets nothing
    cfg = PrepareConfig(train_ratio=0.7, val_ratio=0.1, test_ratio=0.2)
    message = error_of(DataError, lambda: split_assignment(labels, ["0", "cat"], cfg))
    assert "class 'cat'" in message and "'val'" in message


def test_failed_rerun_keeps_existing_output(tmp_path):
    first = run(tmp_path)
    before = (tmp_path / "out" / "dataset.json").read_bytes()
    write_indexed_idx(tmp_path, [0] * 20 + [1] * 3)
    message = error_of(DataError, lambda: run(tmp_path, source="idx", path=str(tmp_path)))
    assert "'1'" in message
    assert (tmp_path / "out" / "dataset.json").read_bytes() == before
    assert load_prepared(tmp_path / "out").meta == first
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_successful_rerun_replaces_output(tmp_path):
    run(tmp_path)
    (tmp_path / "out" / "stale.txt").write_text("from an older run")
    meta = run(tmp_path, seed=3)
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert load_prepared(tmp_path / "out").meta == meta


def test_bad_config_values(tmp_path):
    assert "prepare.seed" in error_of(ConfigError, lambda: run(tmp_path, seed=-1))
    assert "ratio" in error_of(
        ConfigError, lambda: PrepareConfig(train_ratio=0.5, val_ratio=0.1, test_ratio=0.1)
    )
    missing = str(tmp_path / "missing")
    assert missing in error_of(DataError, lambda: run(tmp_path, source="cifar", path=missing))
    assert not (tmp_path / "out").exists()


def test_load_prepared_memmaps_are_read_only(tmp_path):
    run(tmp_path)
    ds = load_prepared(tmp_path / "out")
    images = ds.images("val")
    assert isinstance(images, np.memmap) and not images.flags.writeable
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 1
    assert ds.classes == [str(d) for d in range(10)] and ds.image_shape == (8, 8, 1)
    assert "'dev'" in error_of(DataError, lambda: ds.images("dev"))


def test_load_prepared_refuses_bad_directories(tmp_path):
    assert "nothing" in error_of(DataError, lambda: load_prepared(tmp_path / "nothing"))
    assert "dataset.json" in error_of(DataError, lambda: load_prepared(tmp_path))
    (tmp_path / "dataset.json").write_text("{not json")
    assert "not valid JSON" in error_of(DataError, lambda: load_prepared(tmp_path))
    (tmp_path / "dataset.json").write_text('{"format": 99}')
    assert "format" in error_of(DataError, lambda: load_prepared(tmp_path))
    run(tmp_path)
    (tmp_path / "out" / "test_labels.npy").unlink()
    assert "test_labels.npy" in error_of(DataError, lambda: load_prepared(tmp_path / "out"))
