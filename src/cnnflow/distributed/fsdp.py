"""FSDP (ZeRO-3) with `fully_shard`, alone or as HSDP, and per-rank memory accounting.

Each pipeline block (`stem`, `stage1.0`, ..., `head`) becomes one FSDP unit, then the root
takes whatever is left: one all-gather per block in forward (and again in backward, since
`reshard_after_forward=True` frees the gathered block), so at most about one block's full
parameters are alive at a time beside this rank's 1/fsdp shard of everything.

On a 1-D mesh ("fsdp") the parameters are sharded over all ranks; on a 2-D mesh
("dp", "fsdp") they are sharded inside each replica and gradients are all-reduced across
replicas (HSDP). Both run on gloo (CPU) and nccl.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

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
