"""Bad input to training: one line naming the value, a non-zero exit, nothing lost."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnflow.errors import CnnflowError
from cnnflow.train.data import StreamBatches, plan_streams
from tests.distributed.harness import ROOT, run_torchrun, write_params

CLI = [sys.executable, "-m", "cnnflow.train"]


def _train(params, env=None, timeout=120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([*CLI, "--params", str(params)], capture_output=True, text=True,
                          timeout=timeout, env={**clean, **(env or {})}, cwd=ROOT)


def _one_error_line(proc) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cnnflow: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_unknown_model_name_is_refused(digits_shards, tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path, [])
    params.write_text(params.read_text().replace("name: small_cnn", "name: vgg11"))
    line = _one_error_line(_train(params))
    assert "model.name: expected one of 'small_cnn'" in line and "'vgg11'" in line


def test_batch_not_divisible_across_ranks_names_the_values():
    with pytest.raises(CnnflowError, match=r"train\.batch_size=63: expected a multiple of "
                                           r"streams x grad_accum = 2 x 1 = 2"):
        plan_streams(63, 1, 2, 0)
    with pytest.raises(CnnflowError, match=r"train\.streams=3: expected a multiple of"):
        plan_streams(64, 1, 2, 3)


def test_more_ranks_than_training_samples(digits_shards):
    with pytest.raises(CnnflowError, match=r"train.*1438.*world size 2048|2048.*1438"):
        StreamBatches(str(digits_shards), global_batch=2048, grad_accum=1, rank=0,
                      world_size=2048, streams=0, seed=0, num_workers=0,
                      expected_version=None, mean=[0.0], std=[1.0], augment_images=False,
                      flip=False)


def test_dataset_version_mismatch_names_both(digits_shards, tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path,
                          ["train.dataset_version=" + "ab" * 32])
    line = _one_error_line(_train(params))
    assert "train.dataset_version=abababababab" in line and "hold dataset version" in line


def test_checkpoint_of_another_model_is_refused_then_fresh_starts_over(digits_shards,
                                                                       tmp_path):
    first = write_params(tmp_path / "a.yaml", digits_shards, tmp_path,
                         ["train.epochs=1", "model.width=8"])
    assert _train(first).returncode == 0
    second = write_params(tmp_path / "b.yaml", digits_shards, tmp_path,
                          ["train.epochs=1", "model.width=16"])
    line = _one_error_line(_train(second))
    assert "width=8" in line and "width=16" in line and "checkpoint.fresh=true" in line
    fresh = write_params(tmp_path / "c.yaml", digits_shards, tmp_path,
                         ["train.epochs=1", "model.width=16", "checkpoint.fresh=true"])
    assert _train(fresh).returncode == 0
    assert list(tmp_path.glob("ckpt.old-*/step-*.pt")), "old checkpoints kept aside"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_master_fails_within_the_timeout(digits_shards, tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path,
                          ["parallel.init_timeout_s=3"])
    start = time.monotonic()
    proc = _train(params, env={"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(_free_port())}, timeout=90)
    line = _one_error_line(proc)
    assert "MASTER_ADDR=127.0.0.1" in line and "parallel.init_timeout_s=3s" in line
    # a hang guard, not a speed limit: 3 s of init timeout plus start-up on a loaded machine
    assert time.monotonic() - start < 60


def test_ctrl_c_finishes_the_step_and_checkpoints_it(digits_shards, tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path,
                          ["train.epochs=200", "checkpoint.every_steps=2", "model.width=8"])
    proc = subprocess.Popen([*CLI, "--params", str(params)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Interrupt once training is past its first checkpoint and saving every 2 steps: a
    # complete step-4 checkpoint (written atomically: a step-*.pt name is a whole file).
    def past_first_checkpoint() -> bool:
        return any(int(p.stem.split("-")[1]) >= 4 for p in (tmp_path / "ckpt").glob("step-*.pt"))

    deadline = time.monotonic() + 120  # polls for the event; only guards against a hang
    while time.monotonic() < deadline and proc.poll() is None and not past_first_checkpoint():
        time.sleep(0.05)
    assert past_first_checkpoint(), "no step-4 checkpoint before the interrupt"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # Ctrl-C is handled like a preemption: the step finishes, a checkpoint of it is
    # written, exit 130 (128 + SIGINT) with one line naming it
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    latest = sorted((tmp_path / "ckpt").glob("step-*.pt"))[-1]
    stopped = re.findall(r"interrupted at step (\d+), checkpoint (\S+)$", err, re.M)
    assert len(stopped) == 1, err[-2000:]
    step, path = int(stopped[0][0]), Path(stopped[0][1])
    assert path == latest and step == int(latest.stem.split("-")[1]) >= 4
    payload = torch.load(latest, weights_only=True)
    assert payload["state"]["step"] == step
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))


def test_torchrun_worker_error_is_one_line_per_rank(digits_shards, tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path,
                          ["train.batch_size=63"])
    proc = run_torchrun(2, params)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "cnnflow: error:" in ln]
    assert errors and all("train.batch_size=63" in ln for ln in errors), proc.stderr[-3000:]
