"""The parallelize step: a single-device model + degrees -> a strategy the trainer drives.

    strategy = parallelize(model, params, env, in_shape=(8, 8, 1))
    optimizer = build_optimizer(strategy.parameters(), ...)
    ... resume: strategy.load(payload, optimizer, ckpt) ...
    strategy.finish()                       # DDP wrap / compile, after loading
    loss, correct, count = strategy.train_step(micro, step)

The order is fixed (torchtitan's): norm conversion (syncbatch -> cross-rank BatchNorm on
the data-parallel group) -> memory format -> pipeline split (pp > 1) -> FSDP (fsdp > 1,
per block, then the root) -> DDP (pp = fsdp = 1) -> torch.compile. The model never knows.

| degrees            | strategy | gradients                         | checkpoint       |
|--------------------|----------|-----------------------------------|------------------|
| dp                 | ddp      | DDP all-reduce (hooks, local SGD) | one file, rank 0 |
| fsdp [x dp]        | fsdp/hsdp| reduce-scatter [+ all-reduce]     | DCP directory    |
| pp [x dp]          | pp       | one all-reduce over dp per step   | DCP directory    |

Every strategy's state dict uses the single-device model's names (FSDP keeps them, a
pipeline stage is a `blocks_module`), so DCP checkpoints reshard between fsdp and pp and
the consolidated `full_state_dict()` loads into the single-device model.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from cnnflow.config import Params
from cnnflow.distributed import ddp as dp
from cnnflow.distributed.env import DistEnv
from cnnflow.distributed.mesh import Degrees, build_mesh, resolve_degrees
from cnnflow.errors import CnnflowError, ConfigError
from cnnflow.models import BlockSubset, convert_norm_for_distributed, count_parameters
from cnnflow.train import loop
from cnnflow.train.checkpoint import CheckpointMismatchError

log = logging.getLogger("cnnflow")


class Strategy:
    """Data parallel (DDP): the behaviour of the data-parallel trainer, unchanged."""

    sharded = False  # checkpoints: one file written by rank 0

    def __init__(self, model: nn.Module, params: Params, env: DistEnv, degrees: Degrees):
        self.params, self.env, self.degrees = params, env, degrees
        self.model = model
        self.comm = dp.CommTimer()

    @property
    def name(self) -> str:
        return self.degrees.strategy

    @property
    def data_rank(self) -> int:
        return self.degrees.data_rank

    @property
    def data_world(self) -> int:
        return self.degrees.data_world

    @property
    def loss_ranks(self) -> int:
        """Ranks that compute a loss: summed step losses are divided by this."""
        return self.env.world_size

    @property
    def module(self) -> nn.Module:
        """The unwrapped module this rank trains; its state dict has single-device names."""
        return dp.unwrap(self.model)

    def parameters(self):
        return self.module.parameters()

    def finish(self) -> None:
        """Wrap after a resume has loaded the weights (DDP broadcasts rank 0's at wrap)."""
        self.model, self.comm = dp.wrap_ddp(self.model, self.env, self.params.parallel)
        if self.params.train.compile:
            self.model = torch.compile(self.model)

    def _no_sync(self, skip: bool):
        return dp.no_sync(self.model, skip)

    def train_step(self, micro: list, step: int) -> tuple[float, int, int]:
        """Forward and backward of one optimizer step's micro-batches (no optimizer step);
        (mean loss, correct, samples) of this rank."""
        tc, oc, device = self.params.train, self.params.optim, self.env.device
        local = dp.local_sgd_active(self.params.parallel, step)
        step_loss, correct, count = 0.0, 0, 0
        for i, (x, y) in enumerate(micro):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._no_sync(local or i < len(micro) - 1):
                loss, logits = loop.forward_loss(self.model, x, y, tc.precision,
                                                 oc.label_smoothing)
                (loss / len(micro)).backward()
            step_loss += loss.item() / len(micro)
            correct += int((logits.argmax(1) == y).sum().item())
            count += y.numel()
        return step_loss, correct, count

    def after_step(self, step: int) -> None:
        """Local SGD's periodic parameter averaging (`step` = steps taken)."""
        pc = self.params.parallel
        if dp.local_sgd_active(pc, step - 1) and self.env.distributed and \
                (step - pc.local_sgd_start_step) % pc.local_sgd_period == 0:
            dp.average_parameters(self.model, self.env.world_size)

    def evaluate(self, batches) -> dict[str, float]:
        return loop.evaluate(self.model, batches, self.env.device,
                             self.params.train.precision, self.env.distributed)

    # ---------------------------------------------------------------- checkpoints
    def save(self, ckpt, step: int, optimizer, meta: dict) -> None:
        if self.env.distributed and self.params.parallel.local_sgd_period:
            dp.average_parameters(self.model, self.env.world_size)  # save the mean model
        ckpt.save(step, {"model": self.module.state_dict(),
                         "optimizer": optimizer.state_dict(), **meta})

    def load(self, payload: dict, optimizer, ckpt) -> None:
        self._check_format(payload)
        self.module.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])

    def _check_format(self, payload: dict) -> None:
        if payload.get("sharded", False) != self.sharded:
            theirs = payload.get("strategy", "ddp")
            raise CheckpointMismatchError(
                f"{payload['_path']}: checkpoint of a {theirs} run, this run is {self.name} "
                "(ddp checkpoints are one file, fsdp/pp ones DCP directories); set "
                "checkpoint.fresh=true to start over"
            )

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The single-device model's state dict on global rank 0 (None elsewhere)."""
        if not self.env.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def describe(self) -> dict:
        """This rank's line of the plan."""
        return {"holds": "full model", "params": count_parameters(self.module)}


class _Sharded(Strategy):
    """Checkpoints through torch.distributed.checkpoint: every rank writes its part."""

    sharded = True

    def _dcp_state(self, optimizer) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # flatten: optimizer keys by parameter name, so pipeline stages never collide
        return get_state_dict(self.module, optimizer,
                              options=StateDictOptions(flatten_optimizer_state_dict=True))

    def save(self, ckpt, step: int, optimizer, meta: dict) -> None:
        model_sd, optim_sd = self._dcp_state(optimizer)
        ckpt.save_sharded(step, {"model": model_sd, "optimizer": optim_sd},
                          {**meta, "sharded": True, "strategy": self.name},
                          main=self.env.is_main)

    def load(self, payload: dict, optimizer, ckpt) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        self._check_format(payload)
        model_sd, optim_sd = self._dcp_state(optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        ckpt.load_sharded(payload["_path"], state)
        set_state_dict(self.module, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(flatten_optimizer_state_dict=True))


class FullyShard(_Sharded):
    """FSDP (1-D mesh) or HSDP (2-D mesh: replicate over dp, shard over fsdp)."""

    def __init__(self, model, params, env, degrees, mesh):
        super().__init__(model, params, env, degrees)
        from cnnflow.distributed.fsdp import apply_fsdp

        sub = mesh["dp", "fsdp"] if degrees.dp > 1 else mesh["fsdp"]
        self.model = apply_fsdp(model, sub)

    @property
    def module(self) -> nn.Module:
        return self.model if not hasattr(self.model, "_orig_mod") else self.model._orig_mod

    def finish(self) -> None:
        if self.params.train.compile:
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
        from cnnflow.distributed.fsdp import local_numel

        c = self.degrees.coords
        return {"holds": f"shard {c['fsdp'] + 1}/{self.degrees.fsdp} of every block",
                "params": sum(local_numel(p) for p in self.module.parameters())}


class PipelineParallel(_Sharded):
    """Pipeline stages on the "pp" mesh dimension, replicas on "dp"."""

    def __init__(self, model, params, env, degrees, mesh, in_shape):
        super().__init__(model, params, env, degrees)
        from cnnflow.distributed.pipeline import Pipeline, microbatch_count, partition

        pc, tc = params.parallel, params.train
        if tc.compile:
            raise ConfigError("train.compile=true: not supported with parallel.pp > 1; "
                              "expected false")
        parts = partition(model, pc.stages, split_points=pc.split_points, by=pc.pp_balance,
                          in_shape=in_shape)
        m = microbatch_count(pc, tc.batch_size, tc.grad_accum, degrees.dp)
        self.dp_group = mesh["dp"].get_group()
        try:
            self.pipe = Pipeline(model, parts, pp_rank=degrees.coords["pp"], pp=degrees.pp,
                                 group=mesh["pp"].get_group(), device=env.device,
                                 schedule=pc.pp_schedule, microbatches=m,
                                 grad_accum=tc.grad_accum, label_smoothing=
                                 params.optim.label_smoothing)
        except ValueError as exc:  # the schedule's own micro-batch rules
            raise ConfigError(f"parallel.microbatches={m} with parallel.pp_schedule="
                              f"{pc.pp_schedule!r}: {' '.join(str(exc).split())}") from None
        names = [n for i in self.pipe.indices for n in parts[i]]
        self.holder = BlockSubset(model, names)  # this rank's blocks, full-model names
        self.microbatches = m

    @property
    def loss_ranks(self) -> int:
        return self.degrees.dp  # only the last stage of each replica computes a loss

    @property
    def module(self) -> nn.Module:
        return self.holder

    def finish(self) -> None:
        pass

    def train_step(self, micro, step):
        tc, device = self.params.train, self.env.device
        step_loss, correct, count = 0.0, 0, 0
        for x, y in micro:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with loop.autocast(tc.precision, device):
                loss, logits = self.pipe.step(x, y)
            step_loss += loss
            if logits is not None:
                correct += int((logits.argmax(1) == y).sum().item())
                count += y.numel()
        if self.degrees.dp > 1:
            self._allreduce_grads()
        return step_loss, correct, count

    def _allreduce_grads(self) -> None:
        """Average gradients over the replicas: one flat all-reduce on the dp group."""
        import time

        start = time.perf_counter()
        grads = [p.grad for p in self.holder.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        flat.div_(self.degrees.dp)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        self.comm.seconds += time.perf_counter() - start

    def after_step(self, step: int) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        import torch.nn.functional as F

        device, precision = self.env.device, self.params.train.precision
        for m in self.pipe.modules:
            m.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for images, labels in batches:
            with loop.autocast(precision, device):
                logits = self.pipe.forward(images.to(device) if self.pipe.first else None)
            if logits is not None:
                labels = labels.to(device)
                sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").item()
                sums[1] += (logits.argmax(1) == labels).sum().item()
                sums[2] += labels.numel()
        for m in self.pipe.modules:
            m.train()
        dist.all_reduce(sums)
        count = max(1.0, sums[2].item())
        return {"loss": sums[0].item() / count, "accuracy": sums[1].item() / count,
                "count": sums[2].item()}

    def full_state_dict(self):
        mine = {k: v.detach().cpu() for k, v in self.holder.state_dict().items()}
        if self.degrees.coords["dp"] != 0:
            mine = {}  # replica 0's stages are the model (BatchNorm stats may differ)
        parts = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(mine, parts, dst=0)
        if not self.env.is_main:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in parts:
            full.update(part)
        return full

    def describe(self) -> dict:
        from cnnflow.distributed.pipeline import bubble_fraction

        pc = self.params.parallel
        stages = [f"stage {i}: {self.pipe.parts[i][0]}..{self.pipe.parts[i][-1]}"
                  for i in self.pipe.indices]
        return {"holds": "; ".join(stages), "params": count_parameters(self.holder),
                "bubble": bubble_fraction(pc.stages, self.microbatches, pc.stages_per_rank)}


def check_supported(params: Params, degrees: Degrees) -> None:
    """Refuse settings a strategy cannot honour, naming the key and what is allowed."""
    pc = params.parallel
    if degrees.strategy == "ddp":
        return
    if pc.comm_hook != "none":
        raise ConfigError(f"parallel.comm_hook={pc.comm_hook!r}: a DDP hook; expected 'none' "
                          f"with {degrees.strategy} (parallel.pp={pc.pp}, fsdp={pc.fsdp})")
    if pc.local_sgd_period:
        raise ConfigError(f"parallel.local_sgd_period={pc.local_sgd_period}: DDP only; "
                          f"expected 0 with {degrees.strategy}")


def parallelize(model: nn.Module, params: Params, env: DistEnv, *,
                in_shape: tuple[int, int, int]) -> Strategy:
    """Apply the configured parallelism to a freshly built single-device `model`."""
    degrees = resolve_degrees(params.parallel, env.world_size, env.rank)
    check_supported(params, degrees)
    mesh = build_mesh(degrees, env) if degrees.strategy != "ddp" else None
    if env.distributed:
        group = mesh["dp"].get_group() if degrees.pp > 1 else None
        model = convert_norm_for_distributed(model, params.model, process_group=group,
                                             device=env.device)
    model = model.to(env.device)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        if degrees.pp > 1:
            return PipelineParallel(model, params, env, degrees, mesh, in_shape)
        if degrees.fsdp > 1:
            return FullyShard(model, params, env, degrees, mesh)
    except RuntimeError as exc:  # a collective the backend lacks
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CnnflowError(f"parallel.backend={env.backend}: cannot run {degrees.strategy} "
                           f"(parallel.pp={degrees.pp}, fsdp={degrees.fsdp}): {first}") from None
    return Strategy(model, params, env, degrees)


def log_plan(strategy: Strategy, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Gather every rank's line of the plan on rank 0 and log it; return the rows."""
    oc = strategy.params.optim
    states = 2 if oc.name == "adamw" else (1 if oc.momentum else 0)
    row = {"rank": strategy.env.rank, **strategy.degrees.coords, **strategy.describe()}
    # fp32 parameter + gradient + optimizer state (momentum: 1, AdamW: 2 tensors)
    row["state_mib"] = row["params"] * 4 * (2 + states) / 2**20
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
