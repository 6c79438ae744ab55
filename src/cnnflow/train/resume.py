"""This run's checkpoints: what one holds, when it is written, and resuming from one.

    checkpointer = TrainCheckpointer(store, strategy, optimizer, scheduler, env=env,
                                     config=params.checkpoint, identity=CheckpointIdentity(...))
    state = checkpointer.resume() or TrainState()   # weights, optimizer, scheduler, RNG
    ... every step: checkpointer.mark(state.step); if checkpointer.due(state.step): save
    checkpointer.save(state)                        # collective: every rank calls it

The payload: the strategy's weights and optimizer state (one file, or DCP shards), the
scheduler, the `TrainState` (data position, history), every rank's RNG state, and what a
resumed run must share with this one (model config, dataset version, trajectory
settings; `check_compatible`). `cnnflow.train.checkpoint` is the store underneath.
Loading runs no code from the files (`cnnflow.train.safe_load`).

Another world size (elastic scale-down, a job resubmitted with other resources) resumes
the same trajectory when the batches stay the same: train.streams fixes how each global
batch is drawn, whatever the number of ranks (`cnnflow.train.data`), and a one-file
(DDP) checkpoint or DCP shards load at any world size. A checkpoint whose streams were
"one per rank" (train.streams=0) and would now be others is refused with one line
(`check_world_size`). What still differs: BatchNorm statistics are per rank's part of
the batch (model.norm=group does not depend on it), and float sums are taken in
another order (the final weights agree within 1e-5 relative, not bit for bit).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cnnflow import storage
from cnnflow.config import CheckpointConfig
from cnnflow.distributed.env import DistEnv
from cnnflow.distributed.strategy import Strategy
from cnnflow.train.checkpoint import (
    Checkpointer,
    TrainState,
    check_compatible,
    check_world_size,
    rng_state,
    set_rng_state,
)

log = logging.getLogger("cnnflow")


class Progress:
    """The last step rank 0 finished, so a restart can say how many steps it lost.

    Written every step, so it is one fixed-width pwrite into an open file (microseconds),
    not a new file and a rename (milliseconds on a slow disk). A torn write reads as 0.
    """

    WIDTH = 20

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.path = directory / "progress"
        self.enabled = enabled
        self._fd: int | None = None

    def read(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def write(self, step: int) -> None:
        if not self.enabled:
            return
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(self._fd, f"{step:<{self.WIDTH - 1}}\n".encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class CheckpointIdentity:
    """What a checkpoint must match to be resumed: the model, the data, the trajectory."""

    model_config: dict[str, Any]
    dataset_version: str
    trajectory: dict[str, Any]


def gather_rng(env: DistEnv) -> list[dict]:
    """Every rank's RNG state (dropout differs per rank), collected on rank 0."""
    mine = rng_state()
    if not env.distributed:
        return [mine]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, mine)
    return out


class TrainCheckpointer:
    """Builds this run's checkpoint payload and saves it through the strategy; finds,
    checks and restores the newest one. Only global rank 0 writes files (`store`)."""

    def __init__(self, store: Checkpointer, strategy: Strategy, optimizer, scheduler, *,
                 env: DistEnv, config: CheckpointConfig, identity: CheckpointIdentity
                 ) -> None:
        self.store, self.strategy = store, strategy
        self.optimizer, self.scheduler = optimizer, scheduler
        self.env, self.config, self.identity = env, config, identity
        self.progress = Progress(storage.local_dir(config.dir, "progress"), env.is_main)

    def meta(self, state: TrainState) -> dict[str, Any]:
        """The payload beside the strategy's weights and optimizer state (collective:
        gathers every rank's RNG state)."""
        return {"scheduler": self.scheduler.state_dict(), "state": asdict(state),
                "rng": gather_rng(self.env), "model_config": self.identity.model_config,
                "dataset_version": self.identity.dataset_version,
                "world_size": self.env.world_size, "trajectory": self.identity.trajectory}

    def save(self, state: TrainState) -> Path | None:
        """Checkpoint `state` at its step; every rank calls this. The checkpoint's path on
        rank 0 (None elsewhere)."""
        self.strategy.save(self.store, state.step, self.optimizer, self.meta(state))
        return self.store.latest() if self.env.is_main else None

    def due(self, step: int) -> bool:
        """`checkpoint.every_steps` says to save after `step` (epoch ends always save)."""
        every = self.config.every_steps
        return bool(every) and step % every == 0

    def mark(self, step: int) -> None:
        """Record `step` as finished (the progress file), for the next restart's report."""
        self.progress.write(step)

    def latest(self) -> Path | None:
        return self.store.latest()

    def close(self) -> None:
        self.progress.close()

    def resume(self) -> TrainState | None:
        """Load the newest compatible checkpoint into the strategy, optimizer, scheduler
        and RNG; its TrainState, or None for a fresh start (none, or checkpoint.fresh)."""
        payload = self._payload()
        if payload is None:
            return None
        env = self.env
        self.strategy.load(payload, self.optimizer, self.store)
        self.scheduler.load_state_dict(payload["scheduler"])
        state = TrainState(**payload["state"])
        rng = payload["rng"]
        set_rng_state(rng[env.rank] if env.rank < len(rng) else rng[0])
        lost = max(0, self.progress.read() - state.step)
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if env.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d); %d steps lost since "
                     "it was written (restart %s)", payload["_path"], state.step, state.epoch,
                     state.batch_in_epoch, lost, restarts)
        return state

    def _payload(self) -> dict | None:
        cfg, env = self.config, self.env
        if cfg.fresh and env.is_main:
            aside = self.store.move_aside()
            if aside:
                log.info("checkpoint.fresh: moved old checkpoints to %s", aside)
        if env.distributed:
            dist.barrier()
        if cfg.fresh or not cfg.resume:
            return None
        path = self.store.latest()
        if path is None:
            return None
        payload = self.store.load(path)
        ident = self.identity
        check_world_size(payload, path, ident.trajectory, env.world_size)
        check_compatible(payload, ident.model_config, ident.dataset_version, path,
                         ident.trajectory)
        if payload.get("world_size") != env.world_size and env.is_main:
            norm = ident.model_config.get("norm")
            why = (f"; model.norm={norm} normalises over each rank's part of the batch, so "
                   "the trajectory differs from an uninterrupted run (group keeps it)"
                   if norm == "batch" else "")
            log.warning("resuming %s written by %s ranks with %d ranks: the same %s data "
                        "streams, so the same batches%s", path, payload.get("world_size"),
                        env.world_size, ident.trajectory.get("train.streams"), why)
        payload["_path"] = str(path)
        return payload
