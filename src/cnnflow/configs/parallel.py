"""The `parallel` section of params.yaml, used by `cnnflow.distributed`: parallelism as
degrees (dp x pp x fsdp) plus the DDP and pipeline knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cnnflow.errors import check_config as _check


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallelism as degrees: dp x pp x fsdp = world size."""

    dp: int = 0
    """Data-parallel replicas (0 = world size / (pp x fsdp))."""
    pp: int = 1
    """Pipeline stages (model parallel)."""
    fsdp: int = 1
    """Fully-sharded data-parallel degree (ZeRO-3: parameters, gradients and optimizer
    state split over this many ranks). With dp > 1 too: HSDP, replicas of a sharded model."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved1f1b"] = "1f1b"
    """Pipeline schedule (pp > 1). gpipe: all forwards, then all backwards (activations of
    every micro-batch alive at once); 1f1b: same bubble, at most pp micro-batches of
    activations; interleaved1f1b: 2 stages per rank, bubble roughly halved."""
    microbatches: int = 0
    """Micro-batches per pipeline step (0 = 2 x the number of stages). Must divide the
    per-replica batch train.batch_size / (dp x grad_accum). Bubble = (K-1)/(M+K-1) for K
    stages per replica: more micro-batches, smaller bubble, smaller (slower) kernels."""
    split_points: list[str] = field(default_factory=list)
    """Blocks that start a new pipeline stage (names from `pipeline_blocks`, e.g.
    ['stage2.0'] for 2 stages); [] = balance automatically (see pp_balance)."""
    pp_balance: Literal["flops", "params"] = "flops"
    """Automatic split: equalise measured forward FLOPs (speed) or parameter counts
    (memory) over the stages."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto = nccl on CUDA, gloo on CPU."""
    init_timeout_s: float = 60.0
    """Seconds to wait for MASTER_ADDR:MASTER_PORT and every rank before failing, and the
    process group's timeout for every collective: a peer silent this long (a link down)
    fails the step with one line naming it, instead of hanging."""
    bucket_mb: float = 25.0
    """DDP gradient bucket in MiB (25 = DDP's default; smaller buckets start all-reduce
    earlier in backward but cost more calls)."""
    comm_hook: Literal["none", "bf16", "fp16", "powersgd"] = "none"
    """DDP communication hook: compress gradients to bf16/fp16, or PowerSGD low-rank."""
    powersgd_rank: int = 1
    """PowerSGD matrix approximation rank (1-4 is typical)."""
    powersgd_start_step: int = 10
    """Plain all-reduce for this many steps before PowerSGD starts (warm start)."""
    local_sgd_period: int = 0
    """Local SGD: 0 = off; k >= 1 = ranks step independently and average parameters
    every k steps (no gradient all-reduce in between)."""
    local_sgd_start_step: int = 0
    """Steps of ordinary DDP before local SGD starts."""

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "fsdp"):
            value = getattr(self, name)
            low = 0 if name == "dp" else 1
            _check(value >= low, f"parallel.{name}", f"an int >= {low}", value)
        _check(self.init_timeout_s > 0, "parallel.init_timeout_s", "> 0 seconds",
               self.init_timeout_s)
        _check(self.bucket_mb > 0, "parallel.bucket_mb", "> 0 MiB", self.bucket_mb)
        _check(self.powersgd_rank >= 1, "parallel.powersgd_rank", "an int >= 1",
               self.powersgd_rank)
        _check(self.powersgd_start_step >= 0, "parallel.powersgd_start_step", "an int >= 0",
               self.powersgd_start_step)
        _check(self.local_sgd_period >= 0, "parallel.local_sgd_period", "an int >= 0",
               self.local_sgd_period)
        _check(self.local_sgd_start_step >= 0, "parallel.local_sgd_start_step",
               "an int >= 0", self.local_sgd_start_step)
        _check(self.microbatches >= 0, "parallel.microbatches", "an int >= 0 (0 = auto)",
               self.microbatches)
        _check(len(set(self.split_points)) == len(self.split_points), "parallel.split_points",
               "distinct block names", self.split_points)
        _check(not self.split_points or len(self.split_points) == self.stages - 1,
               "parallel.split_points", f"{self.stages - 1} block names (one per stage after "
               f"the first: parallel.pp={self.pp}, schedule {self.pp_schedule!r}) or []",
               self.split_points)
        _check(not (self.local_sgd_period and self.comm_hook != "none"),
               "parallel.comm_hook", "'none' when parallel.local_sgd_period > 0",
               self.comm_hook)

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages one rank holds: 2 for the interleaved schedule, else 1."""
        return 2 if self.pp_schedule == "interleaved1f1b" and self.pp > 1 else 1

    @property
    def stages(self) -> int:
        """Pipeline stages per replica (1 without pipeline parallelism)."""
        return self.pp * self.stages_per_rank
