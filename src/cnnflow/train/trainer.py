"""Wire the pieces: process group, data streams, model, parallelism, checkpoints, tracker.

`train(params)` runs identically in one process, under torchrun and in a PyTorchJob pod;
only global rank 0 writes outputs, checkpoints and tracker entries. It resumes from the
newest complete checkpoint by itself, so a restarted worker (torchrun --max-restarts, a
PyTorchJob restartPolicy) continues where the job left off. How the model is spread over
the ranks (DDP, FSDP/HSDP, pipeline, dp x pp) is `distributed.parallelize`'s business: the
trainer drives a `Strategy` and always writes a single-device model.pt.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cnnflow.config import Params, flatten
from cnnflow.distributed.env import DistEnv, init_distributed, shutdown
from cnnflow.distributed.mesh import resolve_degrees
from cnnflow.distributed.parallelize import Strategy, log_plan, parallelize
from cnnflow.errors import CnnflowError
from cnnflow.fileio import write_json as _write_json
from cnnflow.models import build_model, count_parameters, model_config_dict, model_from_config_dict
from cnnflow.tracking import NullTracker, Tracker
from cnnflow.train import loop
from cnnflow.train.checkpoint import (
    Checkpointer,
    TrainState,
    check_compatible,
    rng_state,
    set_rng_state,
    trajectory_config,
)
from cnnflow.train.data import StreamBatches, eval_batches

log = logging.getLogger("cnnflow")


class _Progress:
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


def _resume(params: Params, env: DistEnv, ckpt: Checkpointer, model_cfg: dict,
            version: str) -> dict | None:
    cfg = params.checkpoint
    if cfg.fresh and env.is_main:
        aside = ckpt.move_aside()
        if aside:
            log.info("checkpoint.fresh: moved old checkpoints to %s", aside)
    if env.distributed:
        dist.barrier()
    if cfg.fresh or not cfg.resume:
        return None
    path = ckpt.latest()
    if path is None:
        return None
    payload = ckpt.load(path)
    check_compatible(payload, model_cfg, version, path, trajectory_config(params))
    if payload.get("world_size") != env.world_size:
        log.warning("resuming %s written by %s ranks with %d ranks: data order changes",
                    path, payload.get("world_size"), env.world_size)
    payload["_path"] = str(path)
    return payload


def train(params: Params, *, tracker: Tracker | None = None, env: DistEnv | None = None
          ) -> dict[str, Any]:
    """Train `params.model` on `params.train.shards`; return the final summary."""
    tc, pc = params.train, params.parallel
    env = env or init_distributed(pc.backend, pc.init_timeout_s, tc.threads)
    try:
        return _train(params, env, tracker if env.is_main and tracker else NullTracker())
    finally:
        shutdown()


def _train(params: Params, env: DistEnv, tracker: Tracker) -> dict[str, Any]:
    tc, pc, oc = params.train, params.parallel, params.optim
    degrees = resolve_degrees(pc, env.world_size, env.rank)
    shards = tc.shards or params.shard.out_dir
    from cnnflow.data.shards import read_manifest

    manifest = read_manifest(shards)
    norm = manifest["normalize"]
    version = manifest["dataset_version"]
    if tc.dataset_version and tc.dataset_version != version:
        raise CnnflowError(
            f"train.dataset_version={tc.dataset_version[:12]}: the shards in {shards} hold "
            f"dataset version {version[:12]}; re-run prepare and shard, or change the setting"
        )
    data = StreamBatches(
        shards, global_batch=tc.batch_size, grad_accum=tc.grad_accum, rank=degrees.data_rank,
        world_size=degrees.data_world, streams=tc.streams, seed=tc.seed,
        num_workers=tc.loader_workers, expected_version=version, mean=norm["mean"],
        std=norm["std"], augment_images=tc.augment, flip=tc.flip,
    )
    if data.steps_per_epoch < 1:
        raise CnnflowError(
            f"train.batch_size={tc.batch_size}: larger than the {data.loaders[0].samples_per_rank}"
            f" training samples per stream; lower it or use fewer streams"
        )
    in_shape = tuple(manifest["image_shape"])
    num_classes = len(manifest["classes"])
    model_cfg = model_config_dict(params.model, in_shape, num_classes)

    torch.manual_seed(tc.seed)
    model = build_model(params.model, in_shape=in_shape, num_classes=num_classes)
    n_params = count_parameters(model)
    strategy = parallelize(model, params, env, in_shape=in_shape)
    del model  # a pipeline rank keeps only its stages

    out_dir = Path(tc.out_dir)
    ckpt = Checkpointer(params.checkpoint.dir, params.checkpoint.keep, enabled=env.is_main)
    progress = _Progress(Path(params.checkpoint.dir), env.is_main)
    total_steps = data.steps_per_epoch * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    lr = loop.peak_lr(oc, tc.batch_size)
    optimizer = loop.build_optimizer(strategy.parameters(), oc, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: loop.lr_factor(oc, s, total_steps, data.steps_per_epoch)
    )
    state = TrainState()
    payload = _resume(params, env, ckpt, model_cfg, version)
    if payload is not None:
        strategy.load(payload, optimizer, ckpt)
        scheduler.load_state_dict(payload["scheduler"])
        state = TrainState(**payload["state"])
        set_rng_state(payload["rng"][env.rank] if env.rank < len(payload["rng"])
                      else payload["rng"][0])
        lost = max(0, progress.read() - state.step)
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if env.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d); %d steps lost since "
                     "it was written (restart %s)", payload["_path"], state.step, state.epoch,
                     state.batch_in_epoch, lost, restarts)

    strategy.finish()
    log_plan(strategy, optimizer)

    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if payload is None:  # a fresh run: no curves of an earlier run in its logs
            for stale in ("metrics.jsonl", "steps.jsonl", "summary.json"):
                (out_dir / stale).unlink(missing_ok=True)
        tracker.log_params(flatten(params))
        tracker.set_tags({"dataset_version": version, "world_size": str(env.world_size),
                          "parallel.dp": str(degrees.dp), "parallel.pp": str(degrees.pp),
                          "parallel.fsdp": str(degrees.fsdp), "parallel.strategy": strategy.name,
                          "torch": torch.__version__})
        log.info("training %s (%d parameters) on %s: %d ranks (%s), %d streams, global batch "
                 "%d, %d steps/epoch, %d steps", params.model.name, n_params, shards,
                 env.world_size, strategy.name, data.streams, tc.batch_size,
                 data.steps_per_epoch, total_steps)

    prof = _profiler(tc, env, out_dir)
    steps_log = out_dir / "steps.jsonl"
    try:
        _run_epochs(params, env, strategy, data, optimizer, scheduler, state, ckpt, progress,
                    tracker, prof, total_steps, model_cfg, version, steps_log, shards, norm)
    except KeyboardInterrupt:
        last = ckpt.latest()
        raise CnnflowError(
            f"interrupted at step {state.step}; the last complete checkpoint "
            f"{last or '(none)'} is intact and a rerun resumes from it"
        ) from None
    finally:
        progress.close()
        if prof is not None:
            prof.stop()

    full = strategy.full_state_dict()  # collective for sharded strategies
    summary = {"steps": state.step, "epochs": state.epoch, "history": state.history,
               "dataset_version": version, "world_size": env.world_size,
               "strategy": strategy.name}
    final = None
    if env.is_main:
        _save_model(out_dir, full, model_cfg, manifest)
        _write_json(out_dir / "summary.json", summary)
        log.info("wrote %s", out_dir / "model.pt")
        final = strategy.module if strategy.name == "ddp" else _single_device(model_cfg, full)
    if env.distributed:
        dist.barrier()
    summary["model"] = final  # the single-device model on rank 0, None elsewhere
    return summary


def _single_device(model_cfg: dict, state_dict: dict) -> torch.nn.Module:
    model = model_from_config_dict(model_cfg)
    model.load_state_dict(state_dict, strict=True)
    return model


def _profiler(tc, env: DistEnv, out_dir: Path):
    if not tc.profile_steps:
        return None
    trace_dir = out_dir / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)

    def ready(prof):
        path = trace_dir / f"rank{env.rank}.json"
        prof.export_chrome_trace(str(path))
        log.info("rank %d: wrote profiler trace %s", env.rank, path)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if env.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=tc.profile_wait, warmup=1,
                                         active=tc.profile_steps, repeat=1),
        on_trace_ready=ready,
    )
    prof.start()
    return prof


def _run_epochs(params, env, strategy: Strategy, data, optimizer, scheduler, state, ckpt,
                progress, tracker, prof, total_steps, model_cfg, version, steps_log, shards,
                norm):
    tc = params.train
    every = params.checkpoint.every_steps

    def save():
        strategy.save(ckpt, state.step, optimizer, {
            "scheduler": scheduler.state_dict(), "state": asdict(state),
            "rng": _gather_rng(env), "model_config": model_cfg, "dataset_version": version,
            "world_size": env.world_size, "trajectory": trajectory_config(params),
        })

    while state.epoch < tc.epochs and state.step < total_steps:
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
        timing = {"data_s": 0.0, "compute_s": 0.0}
        strategy.comm.pop()
        epoch_start = time.perf_counter()
        steps_this_epoch = 0
        batches = data.epoch(state.epoch, state.batch_in_epoch)
        while state.step < total_steps:
            t0 = time.perf_counter()
            try:
                micro = next(batches)
            except StopIteration:
                break
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_loss, correct, count = strategy.train_step(micro, state.step)
            sums[1] += correct
            sums[2] += count
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.batch_in_epoch += 1
            steps_this_epoch += 1
            sums[0] += step_loss
            strategy.after_step(state.step)
            t2 = time.perf_counter()
            timing["data_s"] += t1 - t0
            timing["compute_s"] += t2 - t1
            if prof is not None:
                prof.step()
            progress.write(state.step)
            if state.step % tc.log_every == 0 or state.step == total_steps:
                mean_loss = _mean_over_ranks(step_loss, env, strategy.loss_ranks)
                if env.is_main:
                    row = {"step": state.step, "epoch": state.epoch, "loss": mean_loss,
                           "lr": scheduler.get_last_lr()[0]}
                    with open(steps_log, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    tracker.log_metrics({"loss": mean_loss, "lr": row["lr"]}, state.step)
            if every and state.step % every == 0:
                save()
        epoch_done = state.batch_in_epoch >= data.steps_per_epoch
        wall = time.perf_counter() - epoch_start
        if env.distributed:
            dist.all_reduce(sums)
        val = strategy.evaluate(
            eval_batches(shards, "val", batch_size=256, rank=strategy.data_rank,
                         world_size=strategy.data_world, mean=norm["mean"], std=norm["std"],
                         expected_version=version))
        samples = sums[2].item()
        row = {
            "epoch": state.epoch, "step": state.step,
            "loss": sums[0].item() / max(1, steps_this_epoch * max(1, strategy.loss_ranks)),
            "train_accuracy": sums[1].item() / max(1.0, samples),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": samples / wall if wall > 0 else 0.0,
            "step_time_s": wall / max(1, steps_this_epoch),
            "data_s": timing["data_s"], "compute_s": timing["compute_s"],
            "comm_s": strategy.comm.pop(),
        }
        if epoch_done:
            state.epoch += 1
            state.batch_in_epoch = 0
        state.history.append(row)
        if env.is_main:
            log.info("epoch %d step %d loss %.4f train_acc %.4f val_acc %.4f %.0f samples/s",
                     row["epoch"], row["step"], row["loss"], row["train_accuracy"],
                     row["val_accuracy"], row["samples_per_s"])
            with open(Path(tc.out_dir) / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            tracker.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "step")},
                                state.step)
        save()


def _mean_over_ranks(value: float, env: DistEnv, ranks: int) -> float:
    """Sum over all ranks / `ranks` (the ranks that computed a loss; others add 0)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / ranks


def _gather_rng(env: DistEnv) -> list[dict]:
    """Every rank's RNG state (dropout differs per rank), collected on rank 0."""
    mine = rng_state()
    if not env.distributed:
        return [mine]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, mine)
    return out


def _save_model(out_dir: Path, state_dict: dict, model_cfg: dict, manifest: dict) -> None:
    """model.pt (the single-device state dict) + model.json: rebuildable without the
    training code, whatever the parallelism was."""
    from cnnflow.train.checkpoint import atomic_save

    atomic_save(state_dict, out_dir / "model.pt")
    meta = {"model": model_cfg, "dataset_version": manifest["dataset_version"],
            "classes": manifest["classes"], "image_shape": manifest["image_shape"],
            "normalize": manifest["normalize"]}
    _write_json(out_dir / "model.json", meta)
