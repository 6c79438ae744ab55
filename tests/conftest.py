"""Session-wide safety net: no test writes the repository's own mlflow/ store."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_tracking_store(tmp_path_factory):
    """Point MLflow (and every subprocess a test starts) at a store in a temp dir, unless a
    test sets its own. Tests that want a server or store of their own monkeypatch it."""
    store = tmp_path_factory.mktemp("mlflow-default") / "mlflow.db"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    yield
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
