"""Fixtures for the tracking tests: digits shards, small trained models, a real MLflow
server on a free loopback port, and a clean environment per test.

The server is session-scoped (starting one costs ~6 s); tests that need their own (the
crash test) start another. No test touches the repository's own mlflow/ directory: each
test runs in its own tmp_path and sets MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cnnflow.config import ModelConfig
from cnnflow.data.loader import build_loader, normalize_batch
from cnnflow.data.manifest import read_manifest
from cnnflow.models import build_model, model_config_dict
from cnnflow.train.checkpoint import atomic_save

# Variables a runner or an earlier test may set; every test starts without them.
ENV = ("MLFLOW_TRACKING_URI", "CNNFLOW_PARENT_RUN_ID", "CNNFLOW_RUNNER", "KFP_RUN_ID",
       "DVC_STAGE", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
       "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ENV:
        monkeypatch.setenv(name, "x")  # recorded, so the delete below is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def shards(digits_shards) -> Path:
    return digits_shards


def make_model_dir(out: Path, shards: Path, *, seed: int, steps: int) -> Path:
    """Train small_cnn `steps` SGD steps and save it exactly like trainer._save_model."""
    manifest = read_manifest(shards)
    norm = manifest["normalize"]
    shape, classes = tuple(manifest["image_shape"]), manifest["classes"]
    torch.manual_seed(seed)
    model = build_model(ModelConfig(), in_shape=shape, num_classes=len(classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = build_loader(shards, "train", batch_size=64, seed=seed)
    done = 0
    while done < steps:
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(
                model(normalize_batch(images, norm["mean"], norm["std"])), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    out.mkdir(parents=True, exist_ok=True)
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    meta = {"model": model_config_dict(ModelConfig(), shape, len(classes)),
            "dataset_version": manifest["dataset_version"], "classes": classes,
            "image_shape": manifest["image_shape"], "normalize": norm}
    (out / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, shards) -> Path:
    """A reasonably trained model (~90% test accuracy)."""
    return make_model_dir(tmp_path_factory.mktemp("good"), shards, seed=0, steps=60)


@pytest.fixture(scope="session")
def weak_model_dir(tmp_path_factory, shards) -> Path:
    """A barely trained model: clearly worse than `model_dir`."""
    return make_model_dir(tmp_path_factory.mktemp("weak"), shards, seed=1, steps=1)


@pytest.fixture(scope="session", autouse=True)
def _booting_server(tmp_path_factory):
    """Start the shared server first, without waiting: it boots (~6 s) while the data
    and models are made."""
    from cnnflow.tracking.server import free_port, start_server

    root = tmp_path_factory.mktemp("mlflow-server")
    server = start_server(root / "mlflow.db", root / "artifacts", port=free_port(),
                          log_path=root / "server.log", wait=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(_booting_server) -> str:
    _booting_server.wait_ready(90)
    return _booting_server.url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """An empty, migrated store: creating the tables costs ~4 s, copying the file ~0."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("sqlite-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def server_uri(mlflow_server, monkeypatch) -> str:
    """Only the real server (bad-input tests: the store makes no difference there)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture(params=["server", "sqlite"])
def tracking_uri(request, monkeypatch, tmp_path) -> str:
    """Each test using this runs against the real server and against a sqlite store."""
    if request.param == "server":
        uri = request.getfixturevalue("mlflow_server")
    else:
        db = tmp_path / "store" / "mlflow.db"
        db.parent.mkdir()
        shutil.copyfile(request.getfixturevalue("sqlite_template"), db)
        uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
