"""Every split is checked against the manifest before it is used, validation included:
`cnnflow train` refuses a damaged validation shard with one line naming it, before any
step, and reports what each check cost once."""

from __future__ import annotations

import json
import re
import shutil

from tests.cli import cnnflow

TINY = ("--set", "tracking.enabled=false", "--set", "train.max_steps=1", "--set",
        "train.epochs=1", "--set", "train.batch_size=32", "--set", "model.width=8",
        "--set", "train.log_every=1")


def test_training_refuses_a_flipped_byte_in_a_validation_shard(digits_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    val = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["shards"][0]
    path = shards / val["name"]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    done = cnnflow("train", *TINY, "--set", f"train.shards={shards}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    error = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "Traceback" not in done.stderr
    assert re.fullmatch(rf"cnnflow: error: {re.escape(str(path))}: sha256 [0-9a-f]{{12}}… "
                        r"does not match the manifest \(expected [0-9a-f]{12}…\)", error[0])
    assert not (tmp_path / "outputs" / "train" / "model.pt").exists()


def test_each_split_is_verified_once_and_its_cost_reported(digits_shards, tmp_path):
    done = cnnflow("train", *TINY, "--set", f"train.shards={digits_shards}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    for split in ("train", "val"):
        entries = manifest["splits"][split]["shards"]
        lines = re.findall(rf"verified (\d+) shards of split {split} \(([\d.]+) MB\) in "
                           r"[\d.]+ s", done.stderr)
        assert lines == [(str(len(entries)), f"{sum(e['bytes'] for e in entries) / 1e6:.1f}")]
