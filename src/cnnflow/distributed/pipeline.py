"""Pipeline (model) parallelism with `torch.distributed.pipelining`.

A cnnflow model is a chain of blocks (`pipeline_blocks`: `stem`, `stage1.0`, ..., `head`).
`partition` cuts it into K = pp x stages_per_rank contiguous stages, at configured split
points or balanced by measured forward FLOPs or parameter counts; stage i runs on pipeline
rank i % pp (torch's placement, so the interleaved schedule holds stages r and r + pp).
Each stage is a `blocks_module`: its parameters keep the full model's names, so stage
state dicts merge into the single-device model's.

Loss scaling: every micro-batch's loss is its mean cross-entropy / (M x grad_accum) and
the schedule does not rescale (`scale_grads=False`), so the gradients summed over the
micro-batches are those of the replica batch's mean loss, as in one process.

`PipelineParallel` is the strategy the trainer drives for pp > 1 (replicas over dp: one
flat gradient all-reduce per step); checkpoints are DCP directories (`Sharded`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.utils.flop_counter import FlopCounterMode

from cnnflow.config import ParallelConfig, TrainConfig
from cnnflow.distributed.compute import autocast
from cnnflow.distributed.env import DistEnv
from cnnflow.distributed.mesh import Degrees
from cnnflow.distributed.strategy import Sharded
from cnnflow.errors import ConfigError
from cnnflow.models import BlockSubset, blocks_module, count_parameters, pipeline_blocks

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # activations sent in forward()
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "interleaved1f1b": ScheduleInterleaved1F1B}


def block_costs(model: nn.Module, in_shape: tuple[int, int, int], by: str) -> list[float]:
    """Per-block cost: forward FLOPs of one sample (`by="flops"`) or parameter count."""
    blocks = pipeline_blocks(model)
    if by == "params":
        return [float(sum(p.numel() for p in b.parameters())) for _, b in blocks]
    h, w, c = in_shape
    x = torch.zeros(1, c, h, w)
    costs = []
    was_training = model.training
    model.eval()  # no running-stat updates from the probe
    with torch.no_grad():
        for _, block in blocks:
            with FlopCounterMode(display=False) as counter:
                x = block(x)
            costs.append(float(counter.get_total_flops()) or 1.0)  # pools/ReLU: ~free
    model.train(was_training)
    return costs


def balance(costs: Sequence[float], parts: int) -> list[int]:
    """Start indices of `parts` contiguous groups minimising the largest group's cost
    (the pipeline runs at the speed of its slowest stage). Exact DP, O(parts x n^2)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: min over splits of blocks[:i] into k groups of the max group cost
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    starts, i = [], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


def partition(model: nn.Module, stages: int, *, split_points: Sequence[str], by: str,
              in_shape: tuple[int, int, int]) -> list[list[str]]:
    """Block names of each of `stages` stages; raises ConfigError for impossible splits."""
    names = [n for n, _ in pipeline_blocks(model)]
    if stages > len(names):
        raise ConfigError(
            f"parallel.pp: {stages} pipeline stages need at least {stages} blocks; this model "
            f"has {len(names)} ({', '.join(names)}); expected pp x stages per rank <= "
            f"{len(names)}"
        )
    if split_points:
        for point in split_points:
            if point not in names:
                raise ConfigError(
                    f"parallel.split_points: {point!r} names no block; expected names from "
                    f"{', '.join(names[1:])}"
                )
        starts = [0] + [names.index(p) for p in split_points]
        if starts != sorted(set(starts)) or starts[1] == 0:
            raise ConfigError(
                f"parallel.split_points={list(split_points)}: expected blocks in model order, "
                f"after {names[0]!r}"
            )
    else:
        starts = balance(block_costs(model, in_shape, by), stages)
    bounds = [*starts, len(names)]
    return [names[bounds[i] : bounds[i + 1]] for i in range(stages)]


def microbatch_count(cfg: ParallelConfig, batch_size: int, grad_accum: int, dp: int) -> int:
    """`parallel.microbatches` (0 = 2 x stages), checked against the per-replica batch."""
    replica_batch = batch_size // (grad_accum * dp)
    m = cfg.microbatches or 2 * cfg.stages
    if replica_batch % m:
        raise ConfigError(
            f"parallel.microbatches={m}: expected a divisor of the per-replica batch "
            f"{replica_batch} = train.batch_size {batch_size} / (dp {dp} x grad_accum "
            f"{grad_accum})"
        )
    return m


def bubble_fraction(stages: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle share of a pipeline step, (K-1)/(M+K-1) for K ranks in the pipeline; the
    interleaved schedule divides the fill/drain by the stages per rank."""
    k = stages // stages_per_rank
    fill = (k - 1) / stages_per_rank
    return fill / (microbatches + fill)


class _Contiguous(nn.Module):
    """A stage whose output is sent in the default layout: gloo refuses to receive into
    strided buffers, and a 1-channel input or channels_last makes convs emit NHWC."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).contiguous()


class Pipeline:
    """This rank's stages of one replica's pipeline and the schedule that drives them."""

    def __init__(self, model: nn.Module, parts: list[list[str]], *, pp_rank: int, pp: int,
                 group: dist.ProcessGroup, device: torch.device, schedule: str,
                 microbatches: int, grad_accum: int, label_smoothing: float) -> None:
        self.parts = parts
        self.pp, self.pp_rank, self.group, self.device = pp, pp_rank, group, device
        self.indices = [i for i in range(len(parts)) if i % pp == pp_rank]
        self.modules = [blocks_module(model, parts[i]) for i in self.indices]
        self.microbatches = microbatches
        self.first = 0 in self.indices
        self.last = len(parts) - 1 in self.indices
        scale = microbatches * grad_accum

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
            return loss / scale

        stages = [PipelineStage(_Contiguous(m), i, len(parts), device, group=group)
                  for m, i in zip(self.modules, self.indices, strict=True)]
        cls = SCHEDULES[schedule]
        if cls is ScheduleInterleaved1F1B:
            self.schedule = cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            (stage,) = stages
            self.schedule = cls(stage, microbatches, loss_fn=loss_fn, scale_grads=False)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """Forward and backward of one replica batch; (sum of the scaled micro-batch
        losses, logits) on the last stage, (0.0, None) elsewhere."""
        losses: list[torch.Tensor] = []
        args = (x,) if self.first else ()
        if self.last:
            logits = self.schedule.step(*args, target=y, losses=losses)
            return float(sum(loss.item() for loss in losses)), logits
        self.schedule.step(*args)
        return 0.0, None

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage % self.pp)

    @torch.no_grad()
    def forward(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Forward only, any batch size (evaluation): activations hop between the ranks
        stage by stage, shape first. The last stage returns logits, others None."""
        k = len(self.parts)
        for i in range(k):
            if i % self.pp != self.pp_rank:
                continue
            if i > 0:
                meta = torch.empty(8, dtype=torch.int64, device=self.device)
                dist.recv(meta, src=self._peer(i - 1), group=self.group)
                shape, dtype = meta[1 : 1 + int(meta[0])].tolist(), _DTYPES[int(meta[7])]
                x = torch.empty(shape, dtype=dtype, device=self.device)
                dist.recv(x, src=self._peer(i - 1), group=self.group)
            x = self.modules[self.indices.index(i)](x)
            if i < k - 1:
                meta = torch.zeros(8, dtype=torch.int64, device=self.device)
                meta[0] = x.dim()
                meta[1 : 1 + x.dim()] = torch.tensor(x.shape)
                meta[7] = _DTYPES.index(x.dtype)
                dist.send(meta, dst=self._peer(i + 1), group=self.group)
                dist.send(x.contiguous(), dst=self._peer(i + 1), group=self.group)
        return x if self.last else None


class PipelineParallel(Sharded):
    """Pipeline stages on the "pp" mesh dimension, replicas on "dp"."""

    def __init__(self, model: nn.Module, env: DistEnv, degrees: Degrees, mesh, *,
                 parallel: ParallelConfig, train: TrainConfig, label_smoothing: float = 0.0,
                 in_shape: tuple[int, int, int]):
        super().__init__(model, env, degrees, parallel=parallel, train=train,
                         label_smoothing=label_smoothing)
        pc, tc = parallel, train
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
                                 grad_accum=tc.grad_accum, label_smoothing=label_smoothing)
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
        tc, device = self.tc, self.env.device
        step_loss, correct, count = 0.0, 0, 0
        for x, y in micro:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(tc.precision, device):
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
        device, precision = self.env.device, self.tc.precision
        for m in self.pipe.modules:
            m.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for images, labels in batches:
            with autocast(precision, device):
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
        pc = self.pc
        stages = [f"stage {i}: {self.pipe.parts[i][0]}..{self.pipe.parts[i][-1]}"
                  for i in self.pipe.indices]
        return {"holds": "; ".join(stages), "params": count_parameters(self.holder),
                "bubble": bubble_fraction(pc.stages, self.microbatches, pc.stages_per_rank)}
