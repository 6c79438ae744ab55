"""Fixtures for tests that run real training processes (gloo on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnflow.config import PrepareConfig


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The default digits data set, prepared and sharded once for the session."""
    from cnnflow.data.prepare import prepare
    from cnnflow.data.shards import write_shards

    base = tmp_path_factory.mktemp("digits")
    prepare(PrepareConfig(out_dir=str(base / "prepared")), show_progress=False)
    write_shards(base / "prepared", base / "shards", samples_per_shard=128, workers=1,
                 show_progress=False)
    return base / "shards"
