"""The `optim` section of params.yaml, used by `cnnflow.train.loop` (optimizer and
learning-rate schedule)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cnnflow.errors import check_config as _check


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    """Peak learning rate for the reference batch `base_batch_size` (see scale_lr)."""
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    scale_lr: bool = False
    """Linear scaling rule (Goyal et al. 2017): lr x global_batch / base_batch_size."""
    base_batch_size: int = 256
    warmup_steps: int = 0
    """Linear warmup from lr/10 to the peak over this many steps (Goyal et al.: ~5 epochs
    when scaling lr to large batches)."""
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = 30
    """schedule=step: multiply lr by `gamma` every this many epochs."""
    gamma: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "a number > 0", self.lr)
        _check(0 <= self.momentum < 1, "optim.momentum", "a number in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "optim.weight_decay", "a number >= 0",
               self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "two numbers in [0, 1)", self.betas)
        _check(self.base_batch_size >= 1, "optim.base_batch_size", "an int >= 1",
               self.base_batch_size)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0", self.warmup_steps)
        _check(self.step_epochs >= 1, "optim.step_epochs", "an int >= 1", self.step_epochs)
        _check(0 < self.gamma <= 1, "optim.gamma", "a number in (0, 1]", self.gamma)
        _check(0 <= self.label_smoothing < 1, "optim.label_smoothing", "a number in [0, 1)",
               self.label_smoothing)
        _check(not (self.nesterov and self.name == "sgd" and self.momentum == 0),
               "optim.nesterov", "false when optim.momentum is 0", self.nesterov)
