"""The champion answers over HTTP from `mlflow models serve`: the README's serve line and
its curl line, as written there (the test's server, port and model name put in)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import requests
import torch

from cnnflow.data.loader import build_loader
from cnnflow.tracking import registry
from cnnflow.tracking.mlflow_tracker import stage_run
from cnnflow.tracking.server import ManagedProcess, free_port


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
    server = _readme_serve("models:/served@champion", port, server_uri, tmp_path / "serve.log")
    try:
        response = requests.post(f"{server.url}/invocations",
                                 json={"inputs": images.float().numpy().tolist()}, timeout=30)
        readme_answer = _readme_curl(port)
    finally:
        server.stop()
    # the README's curl line (its image is digit 0 of the embedded set) gets the
    # probabilities the in-process model gives
    example = np.asarray(_readme_inputs(), dtype=np.float32)
    with torch.no_grad():
        local = registry.packaged(model, meta)(torch.from_numpy(example)).numpy()
    np.testing.assert_allclose(readme_answer, local, rtol=1e-5, atol=1e-7)
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["predictions"], dtype=np.float32)
    assert got.shape == (4, len(meta["classes"]))
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_line(prefix: str) -> str:
    return next(line for line in README.read_text().splitlines() if line.startswith(prefix))


def _readme_inputs() -> list:
    payload = re.search(r"-d '(.*)'$", _readme_line("curl ")).group(1)
    return json.loads(payload)["inputs"]


SERVE = ("MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false MLFLOW_TRACKING_URI=http://127.0.0.1:5000 "
         "mlflow models serve -m models:/cnnflow@champion --env-manager local -h 127.0.0.1 "
         "-p 5001")


def _readme_serve(model_uri: str, port: int, tracking_uri: str, log: Path) -> ManagedProcess:
    """The README's serve line in bash (mlflow from this venv), for `model_uri` on `port`
    against `tracking_uri`; returns once /ping answers."""
    line = _readme_line("MLFLOW_ALLOW_PICKLE_DESERIALIZATION=")
    assert line == SERVE  # what the substitutions below expect
    line = (line.replace("http://127.0.0.1:5000", tracking_uri)
            .replace("models:/cnnflow@champion", model_uri).replace("-p 5001", f"-p {port}"))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    server = ManagedProcess(["bash", "-c", f"exec env {line}"], f"http://127.0.0.1:{port}",
                            "/ping", log, {"PATH": path})
    server.wait_ready(90)
    return server


def _readme_curl(port: int) -> np.ndarray:
    """Run the README's curl line, pointed at `port`, and return its predictions."""
    args = shlex.split(_readme_line("curl "))
    args = [a.replace("127.0.0.1:5001", f"127.0.0.1:{port}") for a in args]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    return np.asarray(json.loads(out.stdout)["predictions"], dtype=np.float32)
