"""Fixtures for the launch tests (`digits_shards` comes from tests/conftest.py)."""

from __future__ import annotations

import yaml

from cnnflow.config import load_params, to_dict


def params_text(overrides: list[str]) -> str:
    """params.yaml text (as the launcher puts it in the job's ConfigMap)."""
    params = load_params(None, ["tracking.enabled=false", *overrides])
    return yaml.safe_dump(to_dict(params), sort_keys=False)
