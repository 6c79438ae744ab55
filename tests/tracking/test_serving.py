"""The champion answers over HTTP from `mlflow models serve` (the README's curl line)."""

from __future__ import annotations

import numpy as np
import requests
import torch

from cnnflow import registry
from cnnflow.data.loader import build_loader
from cnnflow.tracking.mlflow_tracker import stage_run
from cnnflow.tracking.server import free_port, serve_model


def test_champion_is_served(server_uri, shards, model_dir, tmp_path):
    tracker = stage_run("train")
    tracker.log_model(model_dir)
    tracker.close()
    registry.register(tracker.run_id, "served", metrics={"accuracy": 0.9})
    assert registry.promote("served")["decision"] == "promoted"

    images, _ = next(iter(build_loader(shards, "test", batch_size=4, shuffle=False,
                                       drop_last=False)))
    model, meta = registry.load_model_dir(model_dir)
    with torch.no_grad():
        expected = registry.packaged(model, meta)(images.float()).numpy()

    port = free_port()
    server = serve_model("models:/served@champion", port, tracking_uri=server_uri,
                         log_path=tmp_path / "serve.log")
    try:
        # curl -s -X POST http://127.0.0.1:PORT/invocations \
        #   -H 'Content-Type: application/json' -d '{"inputs": [[[[0.0, ...]]]]}'
        response = requests.post(f"{server.url}/invocations",
                                 json={"inputs": images.float().numpy().tolist()}, timeout=30)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["predictions"], dtype=np.float32)
    assert got.shape == (4, len(meta["classes"]))
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
