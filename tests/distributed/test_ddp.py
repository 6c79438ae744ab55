"""Data-parallel training with real torchrun process groups (gloo on CPU)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.distributed.harness import ROOT, read_jsonl, read_probe, run_torchrun, write_params

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FAST = ["train.epochs=2", "model.width=16"]


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_ddp_two_processes_converges_on_digits(digits_shards, tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path,
                          ["train.epochs=6", "train.log_every=5", "train.profile_steps=2",
                           "train.profile_wait=1"])
    _ok(run_torchrun(2, params))
    history = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert len(history) == 6
    assert history[-1]["val_accuracy"] >= 0.93, history[-1]
    assert history[-1]["loss"] < history[0]["loss"]
    for key in ("samples_per_s", "data_s", "compute_s", "comm_s", "lr", "train_accuracy"):
        assert key in history[-1]
    assert history[-1]["comm_s"] > 0  # the timed all-reduce hook ran
    # the final model rebuilds from model.json alone and loads strictly
    from cnnflow.models import model_from_config_dict

    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    model = model_from_config_dict(meta["model"])
    model.load_state_dict(torch.load(tmp_path / "out" / "model.pt"), strict=True)
    # one Chrome trace per rank, with communication in it
    for rank in (0, 1):
        trace = (tmp_path / "out" / "traces" / f"rank{rank}.json").read_text()
        assert "ProfilerStep" in trace and "gloo" in trace.lower()


VARIANTS = {
    "bf16": ["parallel.comm_hook=bf16"],
    "fp16": ["parallel.comm_hook=fp16"],
    "powersgd": ["parallel.comm_hook=powersgd", "parallel.powersgd_start_step=4"],
    "local_sgd": ["parallel.local_sgd_period=4", "parallel.local_sgd_start_step=4"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_communication_hooks_and_local_sgd_converge(digits_shards, tmp_path, variant):
    """Each variant trains to a good model AND did what it says on the wire, as recorded by
    the probe in every worker (tests/distributed/harness.py): which hook ran on how many
    gradient elements, and the dtype and size of each all-reduce."""
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path,
                          ["train.epochs=4", "train.log_every=5", *VARIANTS[variant]])
    probe = tmp_path / "probe"
    _ok(run_torchrun(2, params, probe=probe))
    history = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert history[-1]["val_accuracy"] >= 0.9, history[-1]
    steps = json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]
    start = 4  # powersgd_start_step, local_sgd_start_step
    for rank in (0, 1):
        ev = read_probe(probe, rank)
        assert len(ev["wrap"]) == 1, ev["wrap"]
        n = ev["wrap"][0]["params"]  # the gradient elements of one step
        hooked = sum(h["numel"] for h in ev["hook"])
        names = {h["name"] for h in ev["hook"]}
        from_hook = [a for a in ev["all_reduce"] if a["source"] == "hook"]
        if variant in ("bf16", "fp16"):
            assert names == {f"{variant}_compress_hook"}
            assert hooked == steps * n  # every gradient of every step went through it
            # ... and over the wire compressed: one all-reduce per bucket, in that dtype
            assert len(from_hook) == len(ev["hook"])
            assert {a["dtype"] for a in from_hook} == {
                {"bf16": "bfloat16", "fp16": "float16"}[variant]}, from_hook[:5]
            assert sum(a["numel"] for a in from_hook) == steps * n
        elif variant == "powersgd":
            assert names == {"powerSGD_hook"}
            assert hooked == steps * n
            vanilla = [h for h in ev["hook"] if h["iter"] < start]
            compressed = [h for h in ev["hook"] if h["iter"] >= start]
            assert sum(h["numel"] for h in vanilla) == start * n  # plain all-reduce first
            assert sum(h["numel"] for h in compressed) == (steps - start) * n
            # then one all-reduce of the P factors and one of the Q factors per bucket ...
            ps = [a for a in ev["all_reduce"] if a["tag"] == "p"]
            qs = [a for a in ev["all_reduce"] if a["tag"] == "q"]
            assert len(ps) == len(qs) == len(compressed), (len(ps), len(qs), len(compressed))
            # ... with far fewer elements on the wire than the gradients they stand for
            wire = sum(a["numel"] for a in ev["all_reduce"]
                       if a["source"] == "hook" or a["tag"]) - start * n
            assert 0 < wire < 0.5 * (steps - start) * n, (wire, steps, n)
        else:  # local SGD, period 4 from step 4
            assert names == {"allreduce_hook"}
            # DDP synchronises gradients for the first `start` steps only ...
            assert hooked == start * n, (hooked, n)
            # ... then every rank takes the mean parameters every 4 steps (and before
            # each checkpoint, which saves the mean model)
            averaged = [a["step"] for a in ev["average"]]
            assert set(range(start + 4, steps + 1, 4)) <= set(averaged), averaged
            assert min(averaged) >= start + 4, averaged
            flat = [a for a in ev["all_reduce"] if a["source"] == "average"]
            assert len(flat) == len(averaged)
            assert all(a["numel"] == n and a["dtype"] == "float32" for a in flat), flat[:3]


def test_sigkilled_worker_is_recovered_by_torchrun_max_restarts_bit_for_bit(digits_shards,
                                                                           tmp_path):
    """A worker SIGKILLed mid-training (no chance to checkpoint): torchrun restarts the
    group, it resumes from the last checkpoint, and the job ends with the very weights of
    an uninterrupted run (dropout on: the RNG states come back too)."""
    common = ["train.epochs=3", "checkpoint.every_steps=3", "model.width=16",
              "model.dropout=0.2"]
    ref = write_params(tmp_path / "ref.yaml", digits_shards, tmp_path / "ref", common)
    _ok(run_torchrun(2, ref))

    work = tmp_path / "killed"
    params = write_params(tmp_path / "p.yaml", digits_shards, work, common)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:1",
           "--nproc_per_node=2", "--max-restarts=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--monitor-interval=0.5", "-m",
           "cnnflow.train", "--params", str(params)]
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        # the first checkpoint while the job runs (older ones are rotated away)
        deadline = time.time() + 120  # a hang guard; the loop waits for the condition
        while proc.poll() is None and time.time() < deadline and not any(
                (work / "ckpt").glob("step-*.pt")):
            time.sleep(0.02)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert any((work / "ckpt").glob("step-*.pt")), log_path.read_text()[-3000:]
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "cnnflow.train" in " ".join(c.cmdline())]
        assert len(workers) == 2, [w.cmdline() for w in workers]
        workers[1].send_signal(signal.SIGKILL)
        assert proc.wait(240) == 0, log_path.read_text()[-5000:]
    text = log_path.read_text()
    assert "resumed from" in text and "steps lost" in text, text[-5000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    steps_per_epoch = read_jsonl(work / "out" / "metrics.jsonl")[0]["step"]
    assert summary["steps"] == 3 * steps_per_epoch
    a = torch.load(tmp_path / "ref" / "out" / "model.pt")
    b = torch.load(work / "out" / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bf16_autocast_and_channels_last_in_one_process(digits_shards, tmp_path):
    """bf16 autocast and channels_last train to a sane model. (World-size and grad_accum
    invariance: test_parallel.py, beside the other strategies.)"""
    params = write_params(tmp_path / "bf16.yaml", digits_shards, tmp_path / "bf16",
                          ["train.precision=bf16", "train.channels_last=true",
                           "train.epochs=3", "model.width=16"])
    _ok(run_torchrun(1, params))
    history = read_jsonl(tmp_path / "bf16" / "out" / "metrics.jsonl")
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["val_accuracy"] > 0.8
