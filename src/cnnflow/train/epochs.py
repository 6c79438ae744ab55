"""The epoch loop: optimizer steps, their metrics, checkpoints at the right steps.

    loop = EpochLoop(strategy, optimizer, scheduler, data=streams, validate=validate,
                     checkpointer=checkpointer, tracker=tracker, config=params.train,
                     total_steps=total, distributed=env.distributed, is_main=env.is_main)
    loop.run(state)        # state: TrainState, advanced in place

Gradients come from `strategy.train_step`, checkpoints go through `checkpointer.save`,
every number goes to `tracker.log_metrics` (names: `cnnflow.train.metrics`). The loop
opens no file and knows nothing of MLflow; on ranks > 0 the tracker is a NullTracker.
Collectives (the logged step loss, the epoch sums, validation, checkpoints) run on every
rank in the same order.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from cnnflow.config import TrainConfig
from cnnflow.distributed.strategy import Strategy
from cnnflow.tracking import Tracker
from cnnflow.tracking.files import epoch_row
from cnnflow.train import metrics as m
from cnnflow.train.checkpoint import TrainState
from cnnflow.train.preempt import Preempted, StopSignal

log = logging.getLogger("cnnflow")


class Checkpointing(Protocol):
    def due(self, step: int) -> bool: ...

    def mark(self, step: int) -> None: ...

    def save(self, state: TrainState) -> Path | None: ...

    def latest(self) -> Path | None: ...


class Batches(Protocol):
    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[tuple]]: ...


class EpochLoop:
    """Runs epochs until `config.epochs` or `total_steps`, whichever comes first."""

    def __init__(self, strategy: Strategy, optimizer, scheduler, *, data: Batches,
                 validate: Callable[[], dict[str, float]], checkpointer: Checkpointing,
                 tracker: Tracker, config: TrainConfig, total_steps: int,
                 distributed: bool, is_main: bool, profiler: Any = None,
                 stop: StopSignal | None = None) -> None:
        self.strategy, self.optimizer, self.scheduler = strategy, optimizer, scheduler
        self.data, self.validate = data, validate
        self.checkpointer, self.tracker = checkpointer, tracker
        self.epochs, self.log_every = config.epochs, config.log_every
        self.total_steps = total_steps
        self.distributed, self.is_main, self.profiler = distributed, is_main, profiler
        self.stop = stop
        if stop is not None:
            stop.latest = checkpointer.latest

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def run(self, state: TrainState) -> None:
        while state.epoch < self.epochs and state.step < self.total_steps:
            self.run_epoch(state)

    def run_epoch(self, state: TrainState) -> dict[str, float]:
        """One epoch (or what is left of it) from `state`; its metrics."""
        self.strategy.comm.pop()  # count this epoch's communication only
        meter = m.EpochMeter()
        batches = self.data.epoch(state.epoch, state.batch_in_epoch)
        while state.step < self.total_steps:
            t0 = time.perf_counter()
            micro = next(batches, None)
            if micro is None:
                break
            t1 = time.perf_counter()
            loss, correct, count = self._optimizer_step(micro, state)
            meter.add(loss, correct, count, data_s=t1 - t0,
                      compute_s=time.perf_counter() - t1)
            self._after_step(loss, state)
        return self._end_epoch(meter, state)

    def _optimizer_step(self, micro: list, state: TrainState) -> tuple[float, int, int]:
        self.optimizer.zero_grad(set_to_none=True)
        result = self.strategy.train_step(micro, state.step)
        self.optimizer.step()
        self.scheduler.step()
        state.step += 1
        state.batch_in_epoch += 1
        self.strategy.after_step(state.step)
        return result

    def _after_step(self, loss: float, state: TrainState) -> None:
        step = state.step
        if self.profiler is not None:
            self.profiler.step()
        self.checkpointer.mark(step)
        if step % self.log_every == 0 or step == self.total_steps:
            mean = m.mean_over_ranks(loss, self.distributed, self.strategy.loss_ranks)
            self.tracker.log_metrics(m.step_metrics(mean, self.lr), step)
        saved = self.checkpointer.due(step)
        if saved:
            self.checkpointer.save(state)
        if self.stop is not None:
            self._stop_if_asked(state, saved)

    def _stop_if_asked(self, state: TrainState, saved: bool) -> None:
        """Every rank: when any rank got SIGTERM/SIGINT, checkpoint this step (all ranks
        together) and raise Preempted (train.preempt)."""
        self.stop.step = state.step
        signum = self.stop.agreed(self.distributed)
        if not signum or state.step >= self.total_steps:
            return  # the last step: finishing the run is the shorter way out
        path = self.checkpointer.latest() if saved else self.checkpointer.save(state)
        if self.is_main:
            what = "preempted" if signum == signal.SIGTERM else "interrupted"
            log.warning("%s at step %d, checkpoint %s", what, state.step, path)
        raise Preempted(signum, state.step, str(path) if path else None)

    def _end_epoch(self, meter: m.EpochMeter, state: TrainState) -> dict[str, float]:
        epoch_done = state.batch_in_epoch >= self.data.steps_per_epoch
        wall_s = meter.wall_s()
        m.sum_over_ranks(meter.sums, self.distributed)
        val = self.validate()
        values = m.epoch_metrics(meter, val=val, lr=self.lr, wall_s=wall_s,
                                 comm_s=self.strategy.comm.pop(),
                                 loss_ranks=self.strategy.loss_ranks)
        row = epoch_row(values, epoch=state.epoch, step=state.step)
        self.tracker.log_metrics(values, state.step)  # before the epoch count moves on
        if self.is_main:
            log.info("epoch %d step %d loss %.4f train_acc %.4f val_acc %.4f %.0f samples/s",
                     row["epoch"], row["step"], row["loss"], row["train_accuracy"],
                     row["val_accuracy"], row["samples_per_s"])
        if epoch_done:
            state.epoch += 1
            state.batch_in_epoch = 0
        state.history.append(row)
        self.checkpointer.save(state)
        return values
