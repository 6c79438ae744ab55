"""Fixtures for the launch tests (copied from tests/distributed, not imported across)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cnnflow.config import PrepareConfig, load_params, to_dict


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


def params_text(overrides: list[str]) -> str:
    """params.yaml text (as the launcher puts it in the job's ConfigMap)."""
    params = load_params(None, ["tracking.enabled=false", *overrides])
    return yaml.safe_dump(to_dict(params), sort_keys=False)
