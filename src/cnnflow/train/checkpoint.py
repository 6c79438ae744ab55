"""Atomic checkpoints: write to a temporary file, fsync, rename; keep the last K.

A checkpoint file is complete or absent: a crash (or SIGKILL, or Ctrl-C) while writing
leaves only a `*.tmp` file, which is ignored and cleaned up. The newest complete
checkpoint is found by the step number in its name, `step-00000120.pt`.

Sharded strategies (FSDP, pipeline) write a directory `step-00000120/` instead: every rank
saves its part with torch.distributed.checkpoint into `.step-00000120.tmp/`, rank 0 adds
`meta.pt` (scheduler, RNG, data position) and renames the directory, so it too is
complete or absent.

In object storage (`checkpoint.dir: s3://bucket/ckpt`), which has no rename, the objects
(`step-00000120.pt`, or the DCP prefix `step-00000120/` through fsspec) are written first
and a marker `step-00000120.done` last; only checkpoints with a marker are complete, and
pruning removes the marker first. File operations go through `cnnflow.storage`.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnflow import storage
from cnnflow.config import OptimConfig, ParallelConfig, TrainConfig
from cnnflow.errors import CheckpointMismatchError
from cnnflow.fileio import atomic_write

log = logging.getLogger("cnnflow")
_NAME = re.compile(r"^step-(\d{8})(\.pt)?$")  # a file, or a DCP directory
_DONE = re.compile(r"^(step-\d{8})\.done$")  # object storage: the checkpoint is complete


@dataclass
class TrainState:
    """Where training stands: enough to continue exactly where it stopped."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batch_in_epoch: int = 0
    """Optimizer steps already taken in `epoch`: the data position to resume at."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Per-epoch metrics so far (also written as metrics.jsonl)."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": [int(v) for v in internal],
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npy, py = state["numpy"], state["python"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then raise it.

    A KeyboardInterrupt inside torch.save surfaces as a RuntimeError from its zip writer:
    the checkpoint would still be intact (temp file), but the user would get a traceback
    instead of "interrupted; resume from ...". Only the main thread can set handlers.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # not ours to hold, or a handler that only records it (train.preempt)
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to `path` so that readers see the old file or the whole new one."""
    with deferred_sigint():
        atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")  # tmp+rename


class Checkpointer:
    """Saves and finds checkpoints in one directory. Only global rank 0 saves."""

    def __init__(self, directory: str | Path, keep: int = 3, enabled: bool = True) -> None:
        self.remote = storage.is_remote(directory)
        self.dir = str(directory).rstrip("/") if self.remote else Path(directory)
        self.keep = keep
        self.enabled = enabled

    def path_for(self, step: int) -> Path:
        return storage.join(self.dir, f"step-{step:08d}.pt")

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if self.remote:
            names = storage.list_sizes(self.dir)
            done = sorted(m.group(1) for n in names if (m := _DONE.match(n)))
            return [storage.join(self.dir, f"{d}.pt" if f"{d}.pt" in names else d)
                    for d in done]
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, payload: dict[str, Any]) -> Path | None:
        if not self.enabled:
            return None
        path = self.path_for(step)
        if self.remote:
            _put(payload, path)
            storage.write_bytes(_marker(path), b"")  # last: now it is complete
        else:
            atomic_save(payload, path)
        self._prune()
        return path

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            if self.remote:
                storage.delete(_marker(old))
                storage.delete(old, recursive=not old.endswith(".pt"))
            elif old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)

    def save_sharded(self, step: int, state: dict[str, Any], meta: dict[str, Any], *,
                     main: bool) -> Path:
        """Collective: every rank writes its shards of `state` (DCP); rank 0 writes `meta`
        and publishes the directory by renaming it."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if self.remote:
            return self._save_sharded_remote(step, state, meta, main=main)
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".step-{step:08d}.tmp"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(state, checkpoint_id=tmp)  # returns once every rank's files are written
        if main:
            atomic_save(meta, tmp / "meta.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
        dist.barrier()
        return final

    def _save_sharded_remote(self, step: int, state: dict[str, Any], meta: dict[str, Any],
                             *, main: bool) -> str:
        """save_sharded into a bucket: shards and meta.pt, then the marker."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        final = storage.join(self.dir, f"step-{step:08d}")
        if main:  # leftovers of a crash mid-save, never marked complete
            storage.delete(_marker(final))
            storage.delete(final, recursive=True)
        dist.barrier()
        dcp.save(state, storage_writer=FsspecWriter(final, **storage.fs_options(final)))
        if main:
            _put(meta, storage.join(final, "meta.pt"))
            storage.write_bytes(_marker(final), b"")
            self._prune()
        dist.barrier()
        return final

    def load_sharded(self, path: str | Path, state: dict[str, Any]) -> None:
        """Fill `state` (the shapes this rank holds now) in place from a DCP directory;
        tensors are resharded by name, so any sharded strategy reads any other's. Its
        metadata and non-tensor items are read without unpickling objects (safe_load)."""
        import torch.distributed.checkpoint as dcp

        from cnnflow.train.safe_load import SafePlanner, safe_reader

        where = path if storage.is_remote(path) else Path(path)
        dcp.load(state, storage_reader=safe_reader(where), planner=SafePlanner(where))

    def load(self, path: Path) -> dict[str, Any]:
        """A checkpoint file, or a checkpoint directory's meta.pt (shards: load_sharded);
        tensors and plain data only (weights_only=True): a file that would construct
        other objects is refused with one line, never run."""
        from cnnflow.train.safe_load import load_plain, safe_reader

        if self.remote:  # torch.load reads the object's bytes as a file
            if str(path).endswith(".pt"):
                return load_plain(io.BytesIO(storage.read_bytes(path)), path)
            safe_reader(path).read_metadata()  # a crafted .metadata: refused, on all ranks
            meta = storage.join(path, "meta.pt")
            return load_plain(io.BytesIO(storage.read_bytes(meta)), meta)
        if path.is_dir():
            meta = load_plain(path / "meta.pt")
            safe_reader(path).read_metadata()  # a crafted .metadata: refused here, on all ranks
            return meta
        return load_plain(path)

    def move_aside(self) -> Path | None:
        """`checkpoint.fresh`: keep old checkpoints, out of the resume path."""
        if not self.complete():
            return None
        stamp = time.strftime('%Y%m%d-%H%M%S')
        if self.remote:
            storage.move(self.dir, f"{self.dir}.old-{stamp}")
            return f"{self.dir}.old-{stamp}"
        aside = self.dir.with_name(f"{self.dir.name}.old-{stamp}")
        shutil.move(str(self.dir), aside)
        return aside


def _marker(checkpoint: str) -> str:
    """`.../step-00000120.done` for `.../step-00000120.pt` or `.../step-00000120`."""
    return checkpoint.removesuffix(".pt") + ".done"


def _put(obj: Any, uri: str) -> None:
    """torch.save into one object (a single PUT: whole or absent)."""
    buf = io.BytesIO()
    with deferred_sigint():
        torch.save(obj, buf)
    storage.write_bytes(uri, buf.getvalue())


# The settings a resumed run must share with the run that wrote the checkpoint: changing
# any of them changes the optimisation itself (lr, batch, data order, gradients). Paths,
# logging, threads and the parallel layout may change across a restart, and so may the
# length (train.epochs, train.max_steps): continuing a run for longer is deliberate.
_TRAJECTORY_KEYS = {
    "train": ("batch_size", "grad_accum", "streams", "seed", "augment", "flip",
              "precision"),
    "parallel": ("comm_hook", "powersgd_rank", "powersgd_start_step", "local_sgd_period",
                 "local_sgd_start_step"),
}


def trajectory_config(*, optim: OptimConfig, train: TrainConfig, parallel: ParallelConfig,
                      streams: int = 0) -> dict[str, Any]:
    """`section.key -> value` of every setting that shapes the training trajectory;
    train.streams as the run resolved it (`streams`: 0 means one per rank)."""
    from dataclasses import asdict

    out = {f"optim.{k}": v for k, v in asdict(optim).items()}
    sections = {"train": train, "parallel": parallel}
    for section, keys in _TRAJECTORY_KEYS.items():
        values = asdict(sections[section])
        out.update({f"{section}.{k}": values[k] for k in keys})
    if streams:
        out["train.streams"] = streams
    return out


def check_world_size(payload: dict[str, Any], path: Path, trajectory: dict[str, Any],
                     world_size: int) -> None:
    """A checkpoint resumes at another world size when its batches stay the same: the
    same number of data streams (train.streams fixes them; 0 = one per rank does not).
    Refuse, naming both, when they would change."""
    theirs_world = payload.get("world_size")
    theirs = payload.get("trajectory")
    if theirs_world is None or theirs is None:
        return
    theirs_streams = theirs.get("train.streams") or theirs_world  # 0: one per rank
    theirs["train.streams"] = theirs_streams  # resolved, as check_compatible compares it
    streams = trajectory.get("train.streams")
    if theirs_world != world_size and theirs_streams != streams:
        raise CheckpointMismatchError(
            f"{path}: written by {theirs_world} ranks drawing each batch from "
            f"{theirs_streams} data streams, this run has {world_size} ranks and {streams}; "
            f"the batches would differ: set train.streams={theirs_streams} (a multiple of "
            "the data-parallel world size) to resume it, or checkpoint.fresh=true")


def check_compatible(payload: dict[str, Any], model_config: dict, dataset_version: str,
                     path: Path, trajectory: dict[str, Any] | None = None) -> None:
    """Refuse to resume a checkpoint of another model, data set or training setting,
    naming both values."""
    theirs_model = payload.get("model_config", {})
    if theirs_model != model_config:
        raise CheckpointMismatchError(
            f"{path}: checkpoint of model {_describe(theirs_model)}, configured "
            f"{_describe(model_config)}; set checkpoint.fresh=true to start over"
        )
    theirs_data = payload.get("dataset_version", "")
    if theirs_data != dataset_version:
        raise CheckpointMismatchError(
            f"{path}: checkpoint of dataset version {theirs_data[:12]}, shards are "
            f"{dataset_version[:12]}; set checkpoint.fresh=true to start over"
        )
    theirs = payload.get("trajectory")
    if trajectory is not None and theirs is not None:
        changed = [k for k in trajectory if theirs.get(k) != trajectory[k]]
        if changed:
            what = ", ".join(f"{k} {theirs.get(k)!r} -> {trajectory[k]!r}" for k in changed[:3])
            raise CheckpointMismatchError(
                f"{path}: checkpoint written with other training settings ({what}); "
                "set checkpoint.fresh=true to start over"
            )


def _describe(cfg: dict) -> str:
    keys = ("name", "width", "depth", "norm", "num_classes", "in_shape")
    return "(" + ", ".join(f"{k}={cfg.get(k)}" for k in keys if k in cfg) + ")"
