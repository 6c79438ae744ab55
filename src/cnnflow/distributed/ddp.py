"""Data parallel: DDP with a selectable communication hook, or local SGD.

Order of application (see `parallelize`): norm conversion (SyncBatchNorm) -> memory
format -> DDP -> torch.compile. The model itself never knows it is distributed.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from cnnflow.config import ParallelConfig
from cnnflow.distributed.env import DistEnv


class CommTimer:
    """Seconds between a bucket's all-reduce launch and its completion, summed.

    DDP overlaps these with the rest of backward, so this is communication time, not
    necessarily time the step waited for it.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    def pop(self) -> float:
        value, self.seconds = self.seconds, 0.0
        return value

    def wrap(self, hook):
        def timed(state, bucket):
            start = time.perf_counter()
            fut = hook(state, bucket)

            def done(f):
                self.seconds += time.perf_counter() - start
                return f.value()[0] if isinstance(f.value(), list) else f.value()

            return fut.then(done)

        return timed


def _hook(cfg: ParallelConfig):
    """(state, hook) for `parallel.comm_hook`."""
    if cfg.comm_hook == "bf16":
        return None, default_hooks.bf16_compress_hook
    if cfg.comm_hook == "fp16":
        return None, default_hooks.fp16_compress_hook
    if cfg.comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=cfg.powersgd_rank,
            start_powerSGD_iter=max(2, cfg.powersgd_start_step),  # torch requires >= 2
            use_error_feedback=True,
            warm_start=True,
            random_seed=0,
        )
        return state, powerSGD_hook.powerSGD_hook
    return None, default_hooks.allreduce_hook


def wrap_ddp(model: nn.Module, env: DistEnv, cfg: ParallelConfig) -> tuple[nn.Module, CommTimer]:
    """DDP-wrap `model` (a no-op in a world of 1) and attach the timed comm hook."""
    timer = CommTimer()
    if not env.distributed:
        return model, timer
    if any(p.dim() == 4 and 1 in p.shape[1:] for p in model.parameters()):
        # A conv weight with a size-1 dim (e.g. 1 input channel) has two valid stride
        # layouts; the CPU conv backward may pick the other one, and the reducer warns and
        # copies that one small gradient. Nothing is wrong: keep the log clean.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    ddp = DDP(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        bucket_cap_mb=cfg.bucket_mb,
        forward_sync_buffers=True,  # BatchNorm running stats from rank 0, at init and forward
        gradient_as_bucket_view=True,
    )
    state, hook = _hook(cfg)
    state = dist.group.WORLD if state is None else state
    ddp.register_comm_hook(state, timer.wrap(hook))
    ddp._cnnflow_hook_state = state  # keeps PowerSGD's error feedback reachable
    return ddp, timer


def unwrap(model: nn.Module) -> nn.Module:
    """The single-device module under DDP and torch.compile wrappers."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner) if isinstance(inner, DDP) else inner
    return getattr(inner, "_orig_mod", inner)


def no_sync(model: nn.Module, skip: bool):
    """`model.no_sync()` when `skip` and the model is DDP; a null context otherwise."""
    inner = getattr(model, "_orig_mod", model)
    if skip and isinstance(inner, DDP):
        return inner.no_sync()
    return nullcontext()


def local_sgd_active(cfg: ParallelConfig, step: int) -> bool:
    return cfg.local_sgd_period > 0 and step >= cfg.local_sgd_start_step


@torch.no_grad()
def average_parameters(model: nn.Module, world_size: int) -> None:
    """Local SGD's periodic synchronisation: every rank takes the mean parameters."""
    params = [p.data for p in unwrap(model).parameters()]
    flat = torch.cat([p.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n
