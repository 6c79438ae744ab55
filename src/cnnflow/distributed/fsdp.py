"""FSDP (ZeRO-3) with `fully_shard`, alone or as HSDP, and per-rank memory accounting.

Each pipeline block (`stem`, `stage1.0`, ..., `head`) becomes one FSDP unit, then the root
takes whatever is left: one all-gather per block in forward (and again in backward, since
`reshard_after_forward=True` frees the gathered block), so at most about one block's full
parameters are alive at a time beside this rank's 1/fsdp shard of everything.

On a 1-D mesh ("fsdp") the parameters are sharded over all ranks; on a 2-D mesh
("dp", "fsdp") they are sharded inside each replica and gradients are all-reduced across
replicas (HSDP). Both run on gloo (CPU) and nccl.

`FullyShard` is the strategy the trainer drives for fsdp > 1 (see
`cnnflow.distributed.parallelize`); checkpoints are DCP directories (`Sharded`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from cnnflow.config import ParallelConfig, TrainConfig
from cnnflow.distributed.env import DistEnv
from cnnflow.distributed.mesh import Degrees
from cnnflow.distributed.strategy import Sharded
from cnnflow.models import pipeline_blocks


def apply_fsdp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over `mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP)."""
    for _, block in pipeline_blocks(model):
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank stores: a DTensor's local shard, or the whole tensor."""
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


def state_bytes(params, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds in parameters, gradients and optimizer state (measured)."""
    params = list(params)
    out = {"params": sum(local_numel(p) * p.element_size() for p in params),
           "grads": sum(local_numel(p.grad) * p.grad.element_size() for p in params
                        if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    out["optimizer"] += local_numel(value) * value.element_size()
    return out


class FullyShard(Sharded):
    """FSDP (1-D mesh) or HSDP (2-D mesh: replicate over dp, shard over fsdp)."""

    def __init__(self, model: nn.Module, env: DistEnv, degrees: Degrees, mesh: DeviceMesh, *,
                 parallel: ParallelConfig, train: TrainConfig, label_smoothing: float = 0.0):
        super().__init__(model, env, degrees, parallel=parallel, train=train,
                         label_smoothing=label_smoothing)
        sub = mesh["dp", "fsdp"] if degrees.dp > 1 else mesh["fsdp"]
        self.model = apply_fsdp(model, sub)

    @property
    def module(self) -> nn.Module:
        return self.model if not hasattr(self.model, "_orig_mod") else self.model._orig_mod

    def finish(self) -> None:
        if self.tc.compile:
            self.model = torch.compile(self.model)

    def _no_sync(self, skip: bool):
        # grad_accum: accumulate unsharded gradients locally, reduce-scatter on the last
        self.module.set_requires_gradient_sync(not skip)
        return nullcontext()

    def after_step(self, step: int) -> None:
        pass

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))  # collective; rank 0 gets it all
        return full if self.env.is_main else None

    def describe(self) -> dict:
        c = self.degrees.coords
        return {"holds": f"shard {c['fsdp'] + 1}/{self.degrees.fsdp} of every block",
                "params": sum(local_numel(p) for p in self.module.parameters())}
