"""Fixtures for the launch tests (`digits_shards` comes from tests/conftest.py)."""

from __future__ import annotations

import logging

import pytest
import yaml

from cnnflow.config import load_params, to_dict


def params_text(overrides: list[str]) -> str:
    """params.yaml text (as the launcher puts it in the job's ConfigMap)."""
    params = load_params(None, ["tracking.enabled=false", *overrides])
    return yaml.safe_dump(to_dict(params), sort_keys=False)


@pytest.fixture
def warnings_logged():
    """The messages of the WARNING (and worse) records on the `cnnflow` logger, in order.

    A handler on that logger itself: the CLI sets `propagate = False` on it, which would
    hide its records from caplog's root handler."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("cnnflow")
    handler, level = _Collect(logging.WARNING), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)
