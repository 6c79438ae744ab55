"""What training measures, under names that say what they are.

Per optimizer step, every `train.log_every` steps and at the last one (tracker step = the
optimizer steps taken):

    train/step_loss     the step's mean cross-entropy over its global batch (all
                        micro-batches, all ranks that compute a loss)
    train/lr            the learning rate after the step's scheduler update (the next
                        step's)

Per epoch, at the step count when the epoch ends (or the run, for a cut-short last one):

    train/epoch_loss    mean of the epoch's step losses
    train/accuracy      fraction of the epoch's training samples classified right
                        (augmented, in train mode, while the weights moved)
    val/loss, val/accuracy   mean cross-entropy and accuracy on the whole val split
    train/epoch_lr      the learning rate at the epoch's end
    perf/samples_per_s  training samples of all ranks / the epoch's wall seconds
    perf/step_time_s    the epoch's wall seconds / its optimizer steps
    perf/data_s         rank 0's seconds waiting for batches in the epoch
    perf/compute_s      rank 0's seconds in forward, backward and optimizer steps
    perf/comm_s         rank 0's gradient all-reduce seconds in the epoch (launch to
                        completion, overlapping compute; 0 where not timed: fsdp)

A name is per step or per epoch, never both, so no chart zig-zags between the two. The
JSONL files keep their own column names (`cnnflow.tracking.files`).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

STEP_METRICS = ("train/step_loss", "train/lr")
EPOCH_METRICS = ("train/epoch_loss", "train/accuracy", "val/loss", "val/accuracy",
                 "train/epoch_lr", "perf/samples_per_s", "perf/step_time_s", "perf/data_s",
                 "perf/compute_s", "perf/comm_s")


def step_metrics(loss: float, lr: float) -> dict[str, float]:
    """One optimizer step's metrics (`loss` already averaged over the ranks)."""
    return {"train/step_loss": loss, "train/lr": lr}


class EpochMeter:
    """One epoch's sums on this rank: loss, correct and samples in a float64 tensor (to
    all-reduce), and this rank's data/compute seconds and optimizer steps."""

    def __init__(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
        self.data_s = self.compute_s = 0.0
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, loss: float, correct: int, count: int, *, data_s: float,
            compute_s: float) -> None:
        self.sums[1] += correct
        self.sums[2] += count
        self.sums[0] += loss
        self.steps += 1
        self.data_s += data_s
        self.compute_s += compute_s

    def wall_s(self) -> float:
        return time.perf_counter() - self.start


def epoch_metrics(meter: EpochMeter, *, val: dict[str, float], lr: float, wall_s: float,
                  comm_s: float, loss_ranks: int) -> dict[str, float]:
    """The epoch's metrics from `meter` (its sums already all-reduced) and `val`
    (`{"loss", "accuracy"}` over the val split)."""
    loss_sum, correct, samples = (v.item() for v in meter.sums)
    return {
        "train/epoch_loss": loss_sum / max(1, meter.steps * max(1, loss_ranks)),
        "train/accuracy": correct / max(1.0, samples),
        "val/loss": val["loss"], "val/accuracy": val["accuracy"],
        "train/epoch_lr": lr,
        "perf/samples_per_s": samples / wall_s if wall_s > 0 else 0.0,
        "perf/step_time_s": wall_s / max(1, meter.steps),
        "perf/data_s": meter.data_s, "perf/compute_s": meter.compute_s,
        "perf/comm_s": comm_s,
    }


def sum_over_ranks(sums: torch.Tensor, distributed: bool) -> torch.Tensor:
    """`sums` all-reduced in place (a no-op in one process)."""
    if distributed:
        dist.all_reduce(sums)
    return sums


def mean_over_ranks(value: float, distributed: bool, ranks: int) -> float:
    """Sum over all ranks / `ranks` (the ranks that computed a loss; others add 0)."""
    if not distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / ranks
