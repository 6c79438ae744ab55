"""The parallelize step: a single-device model + degrees -> a strategy the trainer drives.

    strategy = parallelize(model, env, parallel=params.parallel, train=params.train,
                           norm=params.model.norm, label_smoothing=params.optim.label_smoothing,
                           in_shape=(8, 8, 1))
    optimizer = build_optimizer(strategy.parameters(), ...)
    ... resume: strategy.load(payload, optimizer, ckpt) ...
    strategy.finish()                       # DDP wrap / compile, after loading
    loss, correct, count = strategy.train_step(micro, step)

The order is fixed (torchtitan's): norm conversion (syncbatch -> cross-rank BatchNorm on
the data-parallel group) -> memory format -> pipeline split (pp > 1) -> FSDP (fsdp > 1,
per block, then the root) -> DDP (pp = fsdp = 1) -> torch.compile. The model never knows.

| degrees     | strategy  | class (module)              | gradients                   | checkpoint |
|-------------|-----------|-----------------------------|-----------------------------|------------|
| dp          | ddp       | Strategy (strategy)         | DDP all-reduce (hooks, ddp) | one file   |
|             |           |                             | or local SGD                | by rank 0  |
| fsdp [x dp] | fsdp/hsdp | FullyShard (fsdp)           | reduce-scatter [+ all-red.] | DCP dir    |
| pp [x dp]   | pp        | PipelineParallel (pipeline) | one all-reduce over dp/step | DCP dir    |

Every strategy's state dict uses the single-device model's names (FSDP keeps them, a
pipeline stage is a `blocks_module`), so DCP checkpoints reshard between fsdp and pp and
the consolidated `full_state_dict()` loads into the single-device model. What one rank
computes on a batch (autocast, loss, evaluation) is `cnnflow.distributed.compute`.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from cnnflow.config import ParallelConfig, TrainConfig
from cnnflow.distributed.env import DistEnv
from cnnflow.distributed.mesh import Degrees, build_mesh, resolve_degrees
from cnnflow.distributed.strategy import Strategy
from cnnflow.errors import CnnflowError, ConfigError
from cnnflow.models import convert_norm_for_distributed

log = logging.getLogger("cnnflow")


def check_supported(parallel: ParallelConfig, degrees: Degrees) -> None:
    """Refuse settings a strategy cannot honour, naming the key and what is allowed."""
    pc = parallel
    if degrees.strategy == "ddp":
        return
    if pc.comm_hook != "none":
        raise ConfigError(f"parallel.comm_hook={pc.comm_hook!r}: a DDP hook; expected 'none' "
                          f"with {degrees.strategy} (parallel.pp={pc.pp}, fsdp={pc.fsdp})")
    if pc.local_sgd_period:
        raise ConfigError(f"parallel.local_sgd_period={pc.local_sgd_period}: DDP only; "
                          f"expected 0 with {degrees.strategy}")


def parallelize(model: nn.Module, env: DistEnv, *, parallel: ParallelConfig,
                train: TrainConfig, norm: str, label_smoothing: float = 0.0,
                in_shape: tuple[int, int, int]) -> Strategy:
    """Apply the configured parallelism to a freshly built single-device `model`.

    `norm` is `model.norm` (syncbatch becomes cross-rank BatchNorm); `label_smoothing` is
    the loss's (`optim.label_smoothing`); `in_shape` (h, w, c) sizes the pipeline split.
    """
    degrees = resolve_degrees(parallel, env.world_size, env.rank)
    check_supported(parallel, degrees)
    mesh = build_mesh(degrees, env) if degrees.strategy != "ddp" else None
    if env.distributed:
        group = mesh["dp"].get_group() if degrees.pp > 1 else None
        model = convert_norm_for_distributed(model, norm, process_group=group,
                                             device=env.device)
    model = model.to(env.device)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sections = {"parallel": parallel, "train": train, "label_smoothing": label_smoothing}
    try:
        if degrees.pp > 1:
            from cnnflow.distributed.pipeline import PipelineParallel

            return PipelineParallel(model, env, degrees, mesh, in_shape=in_shape, **sections)
        if degrees.fsdp > 1:
            from cnnflow.distributed.fsdp import FullyShard

            return FullyShard(model, env, degrees, mesh, **sections)
    except RuntimeError as exc:  # a collective the backend lacks
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CnnflowError(f"parallel.backend={env.backend}: cannot run {degrees.strategy} "
                           f"(parallel.pp={degrees.pp}, fsdp={degrees.fsdp}): {first}") from None
    return Strategy(model, env, degrees, **sections)


def optimizer_states(optimizer: torch.optim.Optimizer) -> int:
    """Tensors of optimizer state per parameter: Adam(W) 2, SGD with momentum 1, else 0."""
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return 2
    return 1 if optimizer.defaults.get("momentum") else 0


def log_plan(strategy: Strategy, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Gather every rank's line of the plan on rank 0 and log it; return the rows."""
    row = {"rank": strategy.env.rank, **strategy.degrees.coords, **strategy.describe()}
    # fp32 parameter + gradient + optimizer state (momentum: 1, AdamW: 2 tensors)
    row["state_mib"] = row["params"] * 4 * (2 + optimizer_states(optimizer)) / 2**20
    rows = [row]
    if strategy.env.distributed:
        rows = [None] * strategy.env.world_size
        dist.all_gather_object(rows, row)
    if strategy.env.is_main:
        d = strategy.degrees
        log.info("plan: %s on mesh pp=%d x dp=%d x fsdp=%d", strategy.name, d.pp, d.dp, d.fsdp)
        for r in rows:
            extra = f", bubble {r['bubble']:.3f}" if "bubble" in r else ""
            log.info("plan: rank %d (pp %d, dp %d, fsdp %d): %s; %d params, %.2f MiB "
                     "param+grad+optimizer%s", r["rank"], r["pp"], r["dp"], r["fsdp"],
                     r["holds"], r["params"], r["state_mib"], extra)
    return rows
