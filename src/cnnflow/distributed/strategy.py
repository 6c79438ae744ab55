"""What the trainer drives: a `Strategy` holds this rank's part of the model and knows
how to step, evaluate and checkpoint it.

    Strategy        data parallel (DDP, its comm hooks, local SGD); one checkpoint file
    Sharded         base of the strategies whose checkpoints are DCP directories:
      FullyShard      FSDP / HSDP              (cnnflow.distributed.fsdp)
      PipelineParallel  pp, dp x pp            (cnnflow.distributed.pipeline)

`cnnflow.distributed.parallelize` picks one from the degrees. A strategy is configured by
its sections (`ParallelConfig`, `TrainConfig`) and the loss's label smoothing, never by
the whole `Params`. The checkpoint store it is given (`ckpt`) needs `save(step, payload)`,
`save_sharded(step, state, meta, main=...)` and `load_sharded(path, state)`.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnflow.config import ParallelConfig, TrainConfig
from cnnflow.distributed import compute
from cnnflow.distributed import ddp as dp
from cnnflow.distributed.env import DistEnv
from cnnflow.distributed.mesh import Degrees
from cnnflow.errors import CheckpointMismatchError
from cnnflow.models import count_parameters


class Strategy:
    """Data parallel (DDP): the behaviour of the data-parallel trainer, unchanged."""

    sharded = False  # checkpoints: one file written by rank 0

    def __init__(self, model: nn.Module, env: DistEnv, degrees: Degrees, *,
                 parallel: ParallelConfig, train: TrainConfig, label_smoothing: float = 0.0):
        self.env, self.degrees = env, degrees
        self.pc, self.tc, self.label_smoothing = parallel, train, label_smoothing
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
        self.model, self.comm = dp.wrap_ddp(self.model, self.env, self.pc)
        if self.tc.compile:
            self.model = torch.compile(self.model)

    def _no_sync(self, skip: bool):
        return dp.no_sync(self.model, skip)

    def train_step(self, micro: list, step: int) -> tuple[float, int, int]:
        """Forward and backward of one optimizer step's micro-batches (no optimizer step);
        (mean loss, correct, samples) of this rank."""
        tc, device = self.tc, self.env.device
        local = dp.local_sgd_active(self.pc, step)
        step_loss, correct, count = 0.0, 0, 0
        for i, (x, y) in enumerate(micro):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._no_sync(local or i < len(micro) - 1):
                loss, logits = compute.forward_loss(self.model, x, y, tc.precision,
                                                    self.label_smoothing)
                (loss / len(micro)).backward()
            step_loss += loss.item() / len(micro)
            correct += int((logits.argmax(1) == y).sum().item())
            count += y.numel()
        return step_loss, correct, count

    def after_step(self, step: int) -> None:
        """Local SGD's periodic parameter averaging (`step` = steps taken)."""
        pc = self.pc
        if dp.local_sgd_active(pc, step - 1) and self.env.distributed and \
                (step - pc.local_sgd_start_step) % pc.local_sgd_period == 0:
            dp.average_parameters(self.model, self.env.world_size)

    def evaluate(self, batches) -> dict[str, float]:
        return compute.evaluate(self.model, batches, self.env.device, self.tc.precision,
                                self.env.distributed)

    # ---------------------------------------------------------------- checkpoints
    def save(self, ckpt, step: int, optimizer, meta: dict) -> None:
        if self.env.distributed and self.pc.local_sgd_period:
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


class Sharded(Strategy):
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
