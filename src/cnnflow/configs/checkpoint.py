"""The `checkpoint` section of params.yaml, used by `cnnflow.train.checkpoint`."""

from __future__ import annotations

from dataclasses import dataclass

from cnnflow.errors import check_config as _check


@dataclass(kw_only=True)
class CheckpointConfig:
    """Atomic checkpoints and automatic resume."""

    dir: str = "outputs/checkpoints"
    """A directory, or an object storage prefix (s3://bucket/ckpt): there each checkpoint
    is complete once its `.done` marker is written (cnnflow.train.checkpoint)."""
    every_steps: int = 0
    """Also checkpoint every this many steps (0 = only at each epoch end)."""
    keep: int = 3
    """Complete checkpoints to keep (oldest deleted first)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in `dir` when there is one."""
    fresh: bool = False
    """Start from scratch even if `dir` holds a checkpoint of another model or data set
    (those are refused otherwise). Existing checkpoints are moved aside, not deleted."""
    preempt_budget_s: float = 20.0
    """On SIGTERM (preemption, eviction) or SIGINT: seconds to finish the step and write
    a checkpoint before exiting anyway. Below Kubernetes' default 30 s grace period; the
    rendered PyTorchJob's terminationGracePeriodSeconds is this plus a margin."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", "an int >= 0",
               self.every_steps)
        _check(self.preempt_budget_s > 0, "checkpoint.preempt_budget_s", "seconds > 0",
               self.preempt_budget_s)
        _check(self.keep >= 1, "checkpoint.keep", "an int >= 1", self.keep)
