"""Training building blocks: schedule, augmentation, checkpoints, launch environment."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from cnnflow.config import OptimConfig
from cnnflow.distributed.env import DistributedInitError, read_env
from cnnflow.train import loop
from cnnflow.train.checkpoint import Checkpointer, atomic_save, rng_state, set_rng_state


def test_warmup_then_cosine_reaches_zero():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine")
    factors = [loop.lr_factor(cfg, s, 110, 10) for s in range(111)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[5] == pytest.approx(0.55)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.5)
    assert factors[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_step_schedule_and_linear_scaling():
    cfg = OptimConfig(schedule="step", step_epochs=2, gamma=0.5, scale_lr=True,
                      base_batch_size=256, lr=0.1)
    assert [loop.lr_factor(cfg, s, 100, 10) for s in (0, 19, 20, 40)] == [1, 1, 0.5, 0.25]
    assert loop.peak_lr(cfg, 1024) == pytest.approx(0.4)
    assert loop.peak_lr(OptimConfig(lr=0.1), 1024) == pytest.approx(0.1)


def test_augment_is_seeded_keeps_shape_and_only_shifts():
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).reshape(2, 1, 8, 8)
    a = loop.augment(images, torch.Generator().manual_seed(1), flip=False)
    b = loop.augment(images, torch.Generator().manual_seed(1), flip=False)
    c = loop.augment(images, torch.Generator().manual_seed(2), flip=True)
    assert torch.equal(a, b) and a.shape == images.shape and a.dtype == torch.uint8
    assert not torch.equal(a, c)
    # every non-zero output pixel is a pixel of the same image (a crop, not new values)
    for i in range(2):
        values = set(images[i].flatten().tolist()) | {0}
        assert set(a[i].flatten().tolist()) <= values


def test_checkpointer_keeps_last_k_and_ignores_partial_files(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (3, 6, 9):
        ckpt.save(step, {"step": step})
    assert [p.name for p in ckpt.complete()] == ["step-00000006.pt", "step-00000009.pt"]
    (tmp_path / ".step-00000012.pt.123.tmp").write_bytes(b"partial")
    (tmp_path / "step-00000015.pt.tmp").write_bytes(b"partial")
    assert ckpt.latest().name == "step-00000009.pt"
    assert ckpt.load(ckpt.latest())["step"] == 9


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"v": Unpicklable()}, path)
    assert torch.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_unreadable_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "step-00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match=r"step-00000001\.pt: not a readable checkpoint"):
        Checkpointer(tmp_path).load(bad)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1, 0, 1)),
        ({"RANK": "1", "WORLD_SIZE": "3"}, (1, 3, 0, 1)),  # PyTorchJob pod, plain python
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
         (3, 4, 1, 2)),  # torchrun
    ],
)
def test_launch_environment_is_read(monkeypatch, env, expected):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert read_env() == expected


def test_bad_launch_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedInitError, match=r"WORLD_SIZE='two': expected an integer"):
        read_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedInitError, match=r"RANK=2 WORLD_SIZE=2"):
        read_env()
    assert os.environ["RANK"] == "2"


def test_resume_is_refused_when_the_training_trajectory_changed(tmp_path):
    from cnnflow.config import load_params
    from cnnflow.errors import CheckpointMismatchError
    from cnnflow.train.checkpoint import check_compatible, trajectory_config

    def trajectory(p):
        return trajectory_config(optim=p.optim, train=p.train, parallel=p.parallel)

    old = load_params(None, ["optim.lr=0.1"])
    payload = {"model_config": {"name": "small_cnn"}, "dataset_version": "v",
               "trajectory": trajectory(old)}
    path = tmp_path / "step-00000010.pt"
    same_but_paths = load_params(None, ["optim.lr=0.1", "train.out_dir=elsewhere",
                                        "train.threads=1", "parallel.fsdp=2"])
    check_compatible(payload, {"name": "small_cnn"}, "v", path,
                     trajectory(same_but_paths))
    with pytest.raises(CheckpointMismatchError,
                       match=r"other training settings \(optim\.lr 0\.1 -> 0\.05\); "
                             r"set checkpoint\.fresh=true"):
        check_compatible(payload, {"name": "small_cnn"}, "v", path,
                         trajectory(load_params(None, ["optim.lr=0.05"])))


@pytest.mark.parametrize("shape", [(16, 1, 8, 8), (8, 3, 32, 32)])
def test_augment_gather_and_slice_paths_agree_with_a_per_sample_crop(shape):
    images = torch.randint(0, 255, shape, dtype=torch.uint8)
    out = loop.augment(images, torch.Generator().manual_seed(7), flip=True)
    gen = torch.Generator().manual_seed(7)
    n, _, h, w = shape
    pad = max(1, min(h, w) // 8)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop)


def test_preempt_budget_ends_a_step_that_does_not_finish():
    # SIGTERM during a step that never ends: after checkpoint.preempt_budget_s the process
    # exits 143 anyway, with one line naming the last complete checkpoint.
    code = ("import logging, os, signal, threading\n"
            "from cnnflow.train.preempt import StopSignal\n"
            "logging.basicConfig()\n"
            "stop = StopSignal(budget_s=0.5)\n"
            "stop.step, stop.latest = 7, lambda: 'ckpt/step-00000004.pt'\n"
            "with stop.installed():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    threading.Event().wait()  # the step that hangs\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert "checkpoint.preempt_budget_s=0.5s spent after SIGTERM at step 7 before a " \
           "checkpoint was written; the last complete checkpoint ckpt/step-00000004.pt is " \
           "intact" in proc.stderr, proc.stderr


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(1, {"rng": [rng_state()]})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(ckpt.load(path)["rng"][0])  # torch.load(weights_only=True) inside
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_grad_accum_splits_a_step_without_changing_its_samples_or_augmentation(digits_shards):
    """Rank 1 of 2, 4 streams, augmentation and flips on: the two micro-batches of
    grad_accum=2 hold exactly the accum=1 step's images (as augmented) and labels."""
    from cnnflow.train.data import StreamBatches

    def steps(accum: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        batches = StreamBatches(str(digits_shards), global_batch=64, grad_accum=accum,
                                rank=1, world_size=2, streams=4, seed=3, num_workers=0,
                                expected_version=None, mean=[0.5], std=[0.25],
                                augment_images=True, flip=True)
        return list(itertools.islice(batches.epoch(1, start_step=2), 3))

    for (one,), two in zip(steps(1), steps(2), strict=True):
        assert len(two) == 2
        # per micro-batch: stream 2's half, then stream 3's; a step: stream 2, stream 3
        for i in (0, 1):
            halves = [torch.cat([two[0][i][:8], two[1][i][:8]]),
                      torch.cat([two[0][i][8:], two[1][i][8:]])]
            assert torch.equal(torch.cat(halves), one[i])
    assert not torch.equal(steps(1)[0][0][0], steps(1)[1][0][0])  # steps differ
