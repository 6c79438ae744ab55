"""The raw digits copy under data/raw/ is the embedded data set, byte for byte."""

from __future__ import annotations

from pathlib import Path

from cnnflow.config import PrepareConfig
from cnnflow.data.prepare import prepare
from cnnflow.data.raw import export_digits

ROOT = Path(__file__).resolve().parents[2]


def test_raw_copy_gives_the_same_version_as_the_package(tmp_path):
    paths = export_digits(tmp_path / "raw")
    from_raw = prepare(PrepareConfig(path=str(tmp_path / "raw"), out_dir=str(tmp_path / "a")),
                       show_progress=False)
    from_package = prepare(PrepareConfig(out_dir=str(tmp_path / "b")), show_progress=False)
    assert from_raw["version"] == from_package["version"]
    assert from_raw["source"] == "digits"
    # the committed copy is exactly what the exporter writes (not stale, deterministic)
    for path in paths:
        assert (ROOT / "data" / "raw" / "digits" / path.name).read_bytes() == path.read_bytes()
