"""`cnnflow pipeline run --set launch.kind=trainjob`: the kfp.local pipeline's train step
launches a TrainJob through the local TrainJob backend (one node, few steps)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_run_trains_through_a_local_trainjob(tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(ROOT / "data" / "raw" / "digits", ws / "data" / "raw" / "digits")
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    overrides = ["launch.kind=trainjob", "launch.nproc_per_node=1", "train.epochs=1",
                 "train.max_steps=3", "evaluate.register=false"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "CNNFLOW_PARENT_RUN_ID", "KFP_RUN_ID")}
    done = subprocess.run([sys.executable, "-m", "cnnflow.cli", "pipeline", "run",
                           *[a for o in overrides for a in ("--set", o)]], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    train = next(line for line in done.stdout.splitlines() if re.match(r"\[3/5\] train +ok", line))
    job = re.search(r"\(job (\S+), ", train)[1]
    summary = json.loads((ws / "runs" / job / "train" / "summary.json").read_text())
    assert summary["steps"] == 3
    log_name = re.search(r"KFP log  (outputs/kfp/\S+\.log)", done.stdout)[1]
    log_text = (ws / log_name).read_text()
    # the train step ran the TrainJob's node 0 under torchrun, not a PyTorchJob's master
    assert "[node-0] " in log_text and "[master-0] " not in log_text


def test_the_compiled_pipeline_takes_the_kind_and_runtime():
    """`cnnflow pipeline submit ... --set launch.kind=trainjob` (README) sets these."""
    import yaml

    text = (ROOT / "pipelines" / "compiled" / "cnn_training.yaml").read_text()
    spec = next(yaml.safe_load_all(text))  # the pipeline; then its platform spec
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["launch_kind"]["defaultValue"] == "pytorchjob"
    assert params["launch_runtime"]["defaultValue"] == "torch-distributed"
