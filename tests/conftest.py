"""Session-wide fixtures: the digits shards every layer trains on, a safety net so that
no test writes the repository's own mlflow/ store, and each test's environment restored
after it."""

from __future__ import annotations

import os
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


@pytest.fixture(autouse=True)
def _restored_environment():
    """os.environ as it was before the test. Steps called in-process (a KFP component's
    python_func, `run_local`) set the run's identity there (KFP_RUN_ID, CNNFLOW_RUNNER,
    CNNFLOW_PARENT_RUN_ID, ...) as a step's own process would; it must not reach the
    next test on the same worker, whose subprocesses would inherit it."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)
