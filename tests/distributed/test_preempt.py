"""Preemption: SIGTERM finishes the step, checkpoints, exits 143; the rerun loses nothing.

Each run is signalled once its progress file says a few steps are done (a condition,
not a sleep); the resumed run must end with the weights of an uninterrupted 2-process
run: bit for bit at the same world size, within 1e-5 relative at another (1 -> 2, 2 -> 1:
train.streams=2 and GroupNorm keep the batches and the normalisation independent of the
world size; only float sums are taken in another order).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.distributed.harness import ROOT, write_params

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["train.max_steps=30", "train.epochs=2", "model.width=16", "model.norm=group",
          "model.groups=4", "train.streams=2", "train.threads=1", "checkpoint.every_steps=100",
          "checkpoint.preempt_budget_s=15"]
PREEMPTED = re.compile(r"preempted at step (\d+), checkpoint (\S+)$")


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1"}


def _cmd(nproc: int, params: Path) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "cnnflow.train", "--params", str(params)]
    return [sys.executable, "-m", "cnnflow.train.torchrun", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "cnnflow.train", "--params", str(params)]


def _run(nproc: int, params: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(nproc, params), capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _progress(ckpt: Path) -> int:
    """Steps done, from the checkpoint directory's progress file (0 before it exists)."""
    try:
        return int((ckpt / "progress").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _preempt(nproc: int, params: Path, work: Path, target=None) -> tuple[str, int, Path]:
    """Start a run, SIGTERM it (or `target(proc)`'s process) after 3 steps; (stderr,
    stopped step, checkpoint), asserting the exit code and the one log line."""
    proc = subprocess.Popen(_cmd(nproc, params), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 240  # a hang guard; the loop waits for the condition
    while proc.poll() is None and _progress(work / "ckpt") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and _progress(work / "ckpt") >= 3, "run ended before the signal"
    (target(proc) if target else psutil.Process(proc.pid)).send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-4000:]
    lines = [m for m in map(PREEMPTED.search, err.splitlines()) if m]
    assert len(lines) == 1, err[-4000:]
    for bad in ("Traceback", "Connection reset by peer", "ChildFailedError"):
        assert bad not in err, err[-4000:]
    step, path = int(lines[0].group(1)), Path(lines[0].group(2))
    assert 3 <= step < 30 and path == work / "ckpt" / f"step-{step:08d}.pt", err[-2000:]
    assert path.is_file() and not (work / "out" / "model.pt").exists()
    return err, step, path


def _resume(nproc: int, params: Path, step: int | None = None) -> None:
    err = _run(nproc, params).stderr
    at = step if step is not None else r"\d+"
    assert re.search(rf"resumed from \S+ at step {at} .*; 0 steps lost", err), err[-3000:]


def _weights(work: Path) -> dict[str, torch.Tensor]:
    return torch.load(work / "out" / "model.pt", weights_only=True)


def _assert_close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if rel == 0:
            assert torch.equal(a[key], b[key]), key
        else:
            diff = (a[key].double() - b[key].double()).norm()
            assert diff <= rel * max(a[key].double().norm(), 1e-12), (key, float(diff))


@pytest.fixture(scope="module")
def ref(digits_shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted 2-process run."""
    work = tmp_path_factory.mktemp("ref")
    _run(2, write_params(work / "p.yaml", digits_shards, work, COMMON))
    return _weights(work)


def test_single_process_sigterm_then_resume_on_two_processes(ref, digits_shards, tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path, COMMON)
    _, step, _ = _preempt(1, params, tmp_path)  # `python -m cnnflow.train`, a pod's PID 1
    _resume(2, params, step)  # 1 -> 2: resubmitted with more processes
    _assert_close(ref, _weights(tmp_path), rel=1e-5)


def test_sigterm_to_the_torchrun_agent_exits_143_and_resumes_bit_for_bit(ref, digits_shards,
                                                                         tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path, COMMON)
    err, step, path = _preempt(2, params, tmp_path)
    assert "cnnflow: torchrun: stopped by SIGTERM; exit 143" in err
    # resubmitted on 1 process without train.streams: its batches would differ, refused
    unfixed = write_params(tmp_path / "p1.yaml", digits_shards, tmp_path,
                           [*COMMON, "train.streams=0"])
    proc = subprocess.run(_cmd(1, unfixed), capture_output=True, text=True, timeout=120,
                          env=_env(), cwd=ROOT)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cnnflow: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert f"{path}: written by 2 ranks drawing each batch from 2 data streams, this run " \
           "has 1 ranks and 1; the batches would differ: set train.streams=2" in errors[0]
    _resume(2, params, step)
    _assert_close(ref, _weights(tmp_path), rel=0)  # bit for bit


def _one_worker(proc: subprocess.Popen) -> psutil.Process:
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if c.cmdline()[-3:-1] == ["cnnflow.train", "--params"]]
    assert len(workers) == 2, [w.cmdline() for w in workers]
    return workers[1]


def test_sigterm_to_one_worker_stops_every_rank_then_resumes_on_one_process(
        ref, digits_shards, tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path, COMMON)
    err, step, _ = _preempt(2, params, tmp_path, target=_one_worker)
    assert "rank 0 exit 143, rank 1 exit 143" in err, err[-3000:]
    _resume(1, params, step)  # 2 -> 1: an elastic scale-down
    _assert_close(ref, _weights(tmp_path), rel=1e-5)


def test_sigterm_to_cnnflow_launch_train_stops_every_node_of_a_local_trainjob(
        ref, digits_shards, tmp_path):
    """The pipeline's train step path (`launch_training`), as `cnnflow launch train` runs
    it: a 2-node TrainJob on the local backend. SIGTERM to the launcher reaches both
    nodes, rank 0 checkpoints, the launcher exits 143 with no process left; the same
    command again resumes it and ends bit for bit on the uninterrupted run's weights."""
    sets = [*COMMON, f"train.shards={digits_shards}", "tracking.enabled=false",
            "model.dropout=0", "optim.label_smoothing=0", "launch.kind=trainjob",
            "launch.nodes=2", "launch.nproc_per_node=1"]
    cmd = [str(Path(sys.executable).with_name("cnnflow")), "launch", "train", "--run-id",
           "preempted", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    deadline = time.monotonic() + 240  # a hang guard; the loop waits for the condition
    while proc.poll() is None and time.monotonic() < deadline and not any(
            _progress(c) >= 3 for c in tmp_path.glob("runs/*/checkpoints")):
        time.sleep(0.02)
    ckpts = list(tmp_path.glob("runs/*/checkpoints"))
    assert proc.poll() is None and len(ckpts) == 1 and _progress(ckpts[0]) >= 3, \
        "run ended before the signal"
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len([p for p in tree if "cnnflow.train" in " ".join(p.cmdline())]) >= 2
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-4000:]
    lines = [m for m in map(PREEMPTED.search, out.splitlines()) if m]
    assert len(lines) == 1, out[-4000:]
    step = int(lines[0].group(1))
    assert 3 <= step < 30 and Path(lines[0].group(2)) == ckpts[0] / f"step-{step:08d}.pt"
    assert out.splitlines()[-1].startswith("cnnflow: error: TrainJob cnnflow-train-"), \
        out[-2000:]
    survivors = []
    for p in tree:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                survivors.append(p.cmdline())
        except psutil.NoSuchProcess:
            pass
    assert not survivors, survivors

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=_env())
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    text = again.stdout + again.stderr
    assert re.search(rf"resumed from \S+ at step {step} .*; 0 steps lost", text), text[-3000:]
    (out_dir,) = tmp_path.glob("runs/*/train")
    _assert_close(ref, torch.load(out_dir / "model.pt", weights_only=True), rel=0)
