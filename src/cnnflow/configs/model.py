"""The `model` section of params.yaml, used by `cnnflow.models` to build a single-device CNN.

It lives here, not in `cnnflow.models`, because that package imports torch and loading
params must not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cnnflow.errors import check_config as _check


@dataclass(kw_only=True)
class ModelConfig:
    """A single-device CNN, rebuilt from this section plus the data set's shape/classes."""

    name: Literal["small_cnn", "resnet20", "resnet56", "resnet18"] = "small_cnn"
    """small_cnn for 8x8/28x28 digits; resnet20/56 (CIFAR style); resnet18 (CIFAR variant)."""
    width: int = 0
    """Channels of the first stage (0 = the model's default: 64 small_cnn, 16 resnet20/56,
    64 resnet18). Later stages double it."""
    depth: int = 0
    """small_cnn: conv blocks (0 = 2). resnet: 0 keeps the name's depth (20/56/18)."""
    norm: Literal["batch", "syncbatch", "group"] = "batch"
    """batch = BatchNorm (per-rank statistics), syncbatch = SyncBatchNorm across ranks,
    group = GroupNorm (no cross-sample statistics: world-size invariant)."""
    groups: int = 8
    """GroupNorm groups (norm=group); must divide every stage's channel count."""
    dropout: float = 0.2
    """Dropout before the classifier, in [0, 1)."""

    def __post_init__(self) -> None:
        _check(0 <= self.width <= 4096, "model.width", "0 (default) or 1..4096", self.width)
        _check(0 <= self.depth <= 64, "model.depth", "0 (default) or 1..64", self.depth)
        _check(self.groups >= 1, "model.groups", "an int >= 1", self.groups)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "a number in [0, 1)", self.dropout)
