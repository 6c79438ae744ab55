"""Helpers for tests that run real training processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from cnnflow.config import load_params, to_dict

ROOT = Path(__file__).resolve().parents[2]


def write_params(path: Path, shards: Path, work: Path, overrides: list[str]) -> Path:
    """A params.yaml for a run in `work` on `shards`, with `overrides` applied. No dropout
    and no label smoothing unless `overrides` ask: the digits defaults' regularisation is
    tuned for 60 epochs, and per-rank dropout masks differ with the world size."""
    base = [f"train.shards={shards}", f"train.out_dir={work / 'out'}",
            f"checkpoint.dir={work / 'ckpt'}", "train.log_every=1", "tracking.enabled=false",
            "model.dropout=0", "optim.label_smoothing=0"]
    params = load_params(None, base + overrides)
    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return path


def run_torchrun(nproc: int, params: Path, *, extra: list[str] = (), timeout: float = 240,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m cnnflow.train --params FILE`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *extra, "-m", "cnnflow.train", "--params", str(params)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
