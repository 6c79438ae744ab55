"""The `train` section of params.yaml, used by `cnnflow.train.trainer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cnnflow.errors import check_config as _check


@dataclass(kw_only=True)
class TrainConfig:
    """The training run: data, batch, precision, outputs."""

    shards: str = ""
    """Shard directory, file:// URI or object storage prefix such as s3://bucket/shards,
    streamed per rank ("" = shard.out_dir)."""
    dataset_version: str = ""
    """Expected dataset version (sha256 from prepare); shards of another version are
    refused. "" = train on whatever version the shards hold."""
    out_dir: str = "outputs/train"
    """Final model (model.pt + model.json), metrics.jsonl, traces. An object storage
    prefix (s3://bucket/model) is written locally and uploaded at the end, _SUCCESS last."""
    epochs: int = 60
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 64
    """Global batch per optimizer step, over all data-parallel ranks and accumulation."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (DDP skips the all-reduce with no_sync)."""
    streams: int = 0
    """Data streams the global batch is drawn from (0 = one per rank). Set it to a
    multiple of every world size you use (e.g. 4) and the same seed gives the same global
    batches, and so the same losses, with 1, 2 or 4 processes."""
    seed: int = 0
    loader_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    augment: bool = True
    """Random crop (padding 1/8 of the size) and, when `flip`, horizontal flip."""
    flip: bool = False
    """Horizontal flip: off for digits (a flipped 2 is no 2); on for natural images."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 = autocast the forward pass to bfloat16 (CPU and CUDA)."""
    channels_last: bool = False
    compile: bool = False
    """torch.compile the model (slow first steps; pays off on long GPU runs)."""
    threads: int = 0
    """Intra-op threads per process (0 = available cores / local processes)."""
    log_every: int = 10
    """Log step metrics every this many steps."""
    profile_steps: int = 0
    """Record a torch.profiler Chrome trace of this many steps on every rank (0 = off)."""
    profile_wait: int = 2
    """Steps to skip before the profiled ones (warm-up)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            _check(value >= 1, f"train.{name}", "an int >= 1", value)
        _check(self.seed >= 0, "train.seed", "an int >= 0", self.seed)
        for name in ("max_steps", "streams", "loader_workers", "threads", "profile_steps",
                     "profile_wait"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{name}", "an int >= 0", value)
