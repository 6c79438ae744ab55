"""Normalisation layers: one factory for the three `model.norm` choices, and the step that
turns BatchNorm into cross-rank BatchNorm once a process group exists.

Models are built single-device, so `norm: syncbatch` builds a plain `nn.BatchNorm2d`:
`nn.SyncBatchNorm` needs an initialised process group in every training forward. The
parallelize step calls `convert_norm_for_distributed` after `init_process_group`.

Trap (torch 2.13): `nn.SyncBatchNorm.forward` raises "expected input tensor to be on GPU"
for CPU tensors whenever a process group is initialised, even with one rank. On CPU (gloo)
we therefore convert to `AllReduceBatchNorm2d`, a small BatchNorm2d whose statistics are
summed with differentiable all-reduces; on CUDA we use `nn.SyncBatchNorm`. Both keep the
BatchNorm2d state-dict keys, so checkpoints load into any of the three.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from cnnflow.errors import ConfigError

NORMS = ("batch", "syncbatch", "group")


def check_norm(norm: str, groups: int, channels: Iterable[int]) -> None:
    """Raise ConfigError (naming the key) before any layer is built with a bad norm/groups."""
    if norm not in NORMS:
        raise ConfigError(
            f"model.norm: expected one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}"
        )
    if norm != "group":
        return
    counts = sorted(set(channels))
    bad = [c for c in counts if c % groups]
    if groups < 1 or bad:
        raise ConfigError(
            f"model.groups: expected a divisor of every channel count "
            f"({', '.join(map(str, counts))}), got {groups!r}"
        )


def make_norm(norm: str, channels: int, groups: int) -> nn.Module:
    """The normalisation layer for `channels` feature maps; weight 1, bias 0 (deterministic)."""
    check_norm(norm, groups, [channels])
    if norm == "group":
        return nn.GroupNorm(groups, channels)
    # batch and syncbatch: identical single-device layers; see the module docstring.
    return nn.BatchNorm2d(channels)


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with batch statistics over all ranks of `process_group`, on any device.

    Training forward with >1 rank: two differentiable all-reduces (sum, then the sum of
    squared deviations from the global mean: two-pass, so no E[x^2]-E[x]^2 cancellation).
    The gradient flows back through the all-reduces, so every rank's input gradient equals
    the one a single process would compute on the concatenated batch. Evaluation, one rank
    or no process group: exactly `nn.BatchNorm2d`.
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._world() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # autograd-aware

        c = x.shape[1]
        local = torch.tensor([float(x.numel() // c)], dtype=x.dtype, device=x.device)
        summed = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), local]), group=self.process_group)
        count = summed[c]
        mean = summed[:c] / count
        centred = x - mean.view(1, c, 1, 1)
        sq = all_reduce(centred.square().sum(dim=(0, 2, 3)), group=self.process_group)
        var = sq / count  # biased: what normalises the batch
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), count.detach())
        out = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor):
        self.num_batches_tracked.add_(1)
        # momentum None: cumulative moving average, as nn.BatchNorm2d does.
        n = float(self.num_batches_tracked)
        factor = 1.0 / n if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased, factor)

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, process_group: dist.ProcessGroup | None = None
    ) -> AllReduceBatchNorm2d:
        """Same parameters and buffers (shared, not copied), so an optimizer built later
        and the state dict both see one set of tensors."""
        out = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            process_group=process_group,
        )
        if bn.affine:
            out.weight, out.bias = bn.weight, bn.bias
        out.running_mean = bn.running_mean
        out.running_var = bn.running_var
        out.num_batches_tracked = bn.num_batches_tracked
        out.train(bn.training)
        return out


def _to_allreduce(module: nn.Module, process_group: dist.ProcessGroup | None) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        return AllReduceBatchNorm2d.from_batchnorm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, _to_allreduce(child, process_group))
    return module


def convert_norm_for_distributed(
    model: nn.Module,
    norm: str,
    *,
    process_group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Make `norm: syncbatch` models synchronise BatchNorm over `process_group`.

    Call after `init_process_group` and before DDP/FSDP wrapping (DDP broadcasts buffers at
    construction, so it must see the final modules). `process_group` should be the data-
    parallel group: with pipeline parallelism, ranks holding other stages have other
    layers. `norm` is `cfg.norm` (a ModelConfig is accepted too). Other norms: returned
    unchanged. `device`: where the model will run (default: the model's parameters).
    Returns the model (a new object only when the model itself is a BatchNorm layer).
    """
    norm = getattr(norm, "norm", norm)
    if norm != "syncbatch":
        return model
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _to_allreduce(model, process_group)
