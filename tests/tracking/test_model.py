"""The logged model: both MLflow loaders predict what the training process predicted."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cnnflow.data.loader import build_loader, normalize_batch
from cnnflow.errors import CnnflowError
from cnnflow.evaluate import evaluate
from cnnflow.tracking.mlflow_tracker import fluent_target, stage_run
from cnnflow.tracking.registry import load_model_dir


def test_round_trip_through_both_loaders(tracking_uri, shards, model_dir, tmp_path):
    model, meta = load_model_dir(model_dir)
    images, _ = next(iter(build_loader(shards, "test", batch_size=50, shuffle=False,
                                       drop_last=False)))
    with torch.no_grad():  # the training process's view: normalise, forward, softmax
        logits = model(normalize_batch(images, meta["normalize"]["mean"],
                                       meta["normalize"]["std"]))
        expected = torch.softmax(logits, dim=1).numpy()

    tracker = stage_run("train")
    info = tracker.log_model(model_dir)
    tracker.close()

    pixels = images.numpy().astype(np.float32)
    with fluent_target(tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(info.model_uri)
        torch_model = mlflow.pytorch.load_model(f"runs:/{tracker.run_id}/model")
        got_pyfunc = pyfunc.predict(pixels)
        with torch.no_grad():
            got_torch = torch_model(torch.from_numpy(pixels)).numpy()
        single = pyfunc.predict(pixels[:1])  # batch 1 must work for serving
        logged = mlflow.models.get_model_info(info.model_uri)
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    # Same classes always; probabilities equal up to float32 rounding: the exported graph
    # may pick other kernels than eager mode (bit-equal in a fresh process, ~1e-6
    # relative apart in one that trained before).
    for got in (got_pyfunc, got_torch):
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(single, expected[:1], rtol=1e-5, atol=1e-7)
    assert logged.metadata["dataset_version"] == meta["dataset_version"]
    spec = logged.signature.inputs.to_dict()[0]["tensor-spec"]
    assert tuple(spec["shape"]) == (-1, 1, 8, 8) and spec["dtype"] == "float32"
    assert "python_function" in logged.flavors and "pytorch" in logged.flavors
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert "model.pt2" in files and "model.pth" not in files  # pickle-free format

    client = MlflowClient(tracking_uri)
    assert "model.json" in {a.path for a in client.list_artifacts(tracker.run_id)}
    path = client.download_artifacts(tracker.run_id, "model.json")
    assert json.loads(Path(path).read_text()) == meta

    # the registered path scores exactly as the directory it came from
    from_dir = evaluate(model_dir, shards, tmp_path / "a")
    from_uri = evaluate(info.model_uri, shards, tmp_path / "b")
    for key in ("accuracy", "top_k_accuracy", "macro_f1", "weighted_f1", "n"):
        assert from_dir[key] == from_uri[key], key
    assert from_dir["ece"] == pytest.approx(from_uri["ece"], abs=1e-6)
    assert from_dir["confusion_matrix"] == from_uri["confusion_matrix"]


@pytest.mark.parametrize("bad", ["models:/no-such-model/1", "models:/no-such-model@champion",
                                 "runs:/0123456789abcdef0123456789abcdef/model"])
def test_evaluating_a_missing_model_uri_is_one_line(server_uri, shards, bad):
    with pytest.raises(CnnflowError) as err:
        evaluate(bad, shards)
    assert "\n" not in str(err.value) and bad.split("/")[1].split("@")[0] in str(err.value)


def test_a_pickled_model_in_the_registry_is_refused_before_it_loads(server_uri, shards,
                                                                     model_dir, tmp_path):
    """Whoever can write the artifacts can put a pickle-format model there (MLflow loads
    those by default, which runs their code): cnnflow refuses it in one line."""
    meta = json.loads((model_dir / "model.json").read_text())
    with fluent_target(server_uri), mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(torch.nn.Linear(64, 10), name="model",
                                        serialization_format="pickle", metadata=meta)
    uri = f"runs:/{run.info.run_id}/model"
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(
        info.model_uri, tracking_uri=server_uri)).rglob("*")}
    assert "model.pth" in files  # a pickle, as MLflow stores one
    with pytest.raises(CnnflowError) as err:
        evaluate(uri, shards, tmp_path / "reports")
    assert str(err.value) == (f"{uri}: refused: the model is stored as a pickle, which can "
                              "run code when loaded; cnnflow logs and loads pt2 "
                              "(torch.export) models only")
    assert not (tmp_path / "reports").exists()
