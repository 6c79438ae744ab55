"""Wire the pieces: process group, data streams, model, DDP, checkpoints, tracker.

`train(params)` runs identically in one process, under torchrun and in a PyTorchJob pod;
only global rank 0 writes outputs, checkpoints and tracker entries. It resumes from the
newest complete checkpoint by itself, so a restarted worker (torchrun --max-restarts, a
PyTorchJob restartPolicy) continues where the job left off.
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
from cnnflow.distributed import ddp as dp
from cnnflow.distributed.env import DistEnv, init_distributed, shutdown
from cnnflow.errors import CnnflowError
from cnnflow.models import (
    build_model,
    convert_norm_for_distributed,
    count_parameters,
    model_config_dict,
)
from cnnflow.tracking import NullTracker, Tracker
from cnnflow.train import loop
from cnnflow.train.checkpoint import (
    Checkpointer,
    TrainState,
    check_compatible,
    rng_state,
    set_rng_state,
)
from cnnflow.train.data import StreamBatches, eval_batches

log = logging.getLogger("cnnflow")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class _Progress:
    """The last step rank 0 finished, so a restart can say how many steps it lost."""

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.path = directory / "progress.json"
        self.enabled = enabled

    def read(self) -> int:
        try:
            return int(json.loads(self.path.read_text())["step"])
        except (OSError, ValueError, KeyError):
            return 0

    def write(self, step: int) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(self.path, {"step": step})


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
    check_compatible(payload, model_cfg, version, path)
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
    if pc.pp > 1 or pc.fsdp > 1:
        raise CnnflowError(
            f"parallel.pp={pc.pp} parallel.fsdp={pc.fsdp}: this trainer runs data parallel "
            "only; expected pp=1 and fsdp=1"
        )
    if pc.dp not in (0, env.world_size):
        raise CnnflowError(
            f"parallel.dp={pc.dp}: expected 0 or the world size {env.world_size} "
            "(dp x pp x fsdp must equal the world size)"
        )
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
        shards, global_batch=tc.batch_size, grad_accum=tc.grad_accum, rank=env.rank,
        world_size=env.world_size, streams=tc.streams, seed=tc.seed,
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
    if env.distributed:
        model = convert_norm_for_distributed(model, params.model, device=env.device)
    model = model.to(env.device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)

    out_dir = Path(tc.out_dir)
    ckpt = Checkpointer(params.checkpoint.dir, params.checkpoint.keep, enabled=env.is_main)
    progress = _Progress(Path(params.checkpoint.dir), env.is_main)
    total_steps = data.steps_per_epoch * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    lr = loop.peak_lr(oc, tc.batch_size)
    optimizer = loop.build_optimizer(model.parameters(), oc, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: loop.lr_factor(oc, s, total_steps, data.steps_per_epoch)
    )
    state = TrainState()
    payload = _resume(params, env, ckpt, model_cfg, version)
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
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

    model, comm = dp.wrap_ddp(model, env, pc)
    if tc.compile:
        model = torch.compile(model)

    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tracker.log_params(flatten(params))
        tracker.set_tags({"dataset_version": version, "world_size": str(env.world_size),
                          "parallel.dp": str(env.world_size), "torch": torch.__version__})
        log.info("training %s (%d parameters) on %s: %d ranks, %d streams, global batch %d, "
                 "%d steps/epoch, %d steps", params.model.name, count_parameters(model),
                 shards, env.world_size, data.streams, tc.batch_size, data.steps_per_epoch,
                 total_steps)

    prof = _profiler(tc, env, out_dir)
    steps_log = out_dir / "steps.jsonl"
    try:
        _run_epochs(params, env, model, data, optimizer, scheduler, state, ckpt, progress,
                    comm, tracker, prof, total_steps, model_cfg, version, steps_log, shards,
                    norm)
    except KeyboardInterrupt:
        last = ckpt.latest()
        raise CnnflowError(
            f"interrupted at step {state.step}; the last complete checkpoint "
            f"{last or '(none)'} is intact and a rerun resumes from it"
        ) from None
    finally:
        if prof is not None:
            prof.stop()

    final = dp.unwrap(model)
    summary = {"steps": state.step, "epochs": state.epoch, "history": state.history,
               "dataset_version": version, "world_size": env.world_size}
    if env.is_main:
        _save_model(out_dir, final, model_cfg, manifest)
        _write_json(out_dir / "summary.json", summary)
        log.info("wrote %s", out_dir / "model.pt")
    if env.distributed:
        dist.barrier()
    summary["model"] = final
    return summary


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


def _run_epochs(params, env, model, data, optimizer, scheduler, state, ckpt, progress, comm,
                tracker, prof, total_steps, model_cfg, version, steps_log, shards, norm):
    tc, pc, oc = params.train, params.parallel, params.optim
    device = env.device
    every = params.checkpoint.every_steps

    def save():
        if env.distributed and pc.local_sgd_period:
            dp.average_parameters(model, env.world_size)  # checkpoints hold the mean model
        rngs = _gather_rng(env)
        ckpt.save(state.step, {
            "model": dp.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "state": asdict(state), "rng": rngs,
            "model_config": model_cfg, "dataset_version": version,
            "world_size": env.world_size,
        })

    model.train()
    while state.epoch < tc.epochs and state.step < total_steps:
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
        timing = {"data_s": 0.0, "compute_s": 0.0}
        comm.pop()
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
            local = dp.local_sgd_active(pc, state.step)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for i, (x, y) in enumerate(micro):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if tc.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                skip = local or i < len(micro) - 1
                with dp.no_sync(model, skip):
                    loss, logits = loop.forward_loss(model, x, y, tc.precision,
                                                     oc.label_smoothing)
                    (loss / len(micro)).backward()
                step_loss += loss.item() / len(micro)
                sums[1] += (logits.argmax(1) == y).sum().item()
                sums[2] += y.numel()
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.batch_in_epoch += 1
            steps_this_epoch += 1
            sums[0] += step_loss
            if local and env.distributed and (state.step - pc.local_sgd_start_step) % \
                    pc.local_sgd_period == 0:
                dp.average_parameters(model, env.world_size)
            t2 = time.perf_counter()
            timing["data_s"] += t1 - t0
            timing["compute_s"] += t2 - t1
            if prof is not None:
                prof.step()
            progress.write(state.step)
            if state.step % tc.log_every == 0 or state.step == total_steps:
                mean_loss = _mean_over_ranks(step_loss, env)
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
        val = loop.evaluate(
            model, eval_batches(shards, "val", batch_size=256, rank=env.rank,
                                world_size=env.world_size, mean=norm["mean"], std=norm["std"],
                                expected_version=version),
            device, tc.precision, env.distributed)
        samples = sums[2].item()
        row = {
            "epoch": state.epoch, "step": state.step,
            "loss": sums[0].item() / max(1, steps_this_epoch * max(1, env.world_size)),
            "train_accuracy": sums[1].item() / max(1.0, samples),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": samples / wall if wall > 0 else 0.0,
            "step_time_s": wall / max(1, steps_this_epoch),
            "data_s": timing["data_s"], "compute_s": timing["compute_s"],
            "comm_s": comm.pop(),
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


def _mean_over_ranks(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / env.world_size


def _gather_rng(env: DistEnv) -> list[dict]:
    """Every rank's RNG state (dropout differs per rank), collected on rank 0."""
    mine = rng_state()
    if not env.distributed:
        return [mine]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, mine)
    return out


def _save_model(out_dir: Path, model: torch.nn.Module, model_cfg: dict, manifest: dict) -> None:
    """model.pt (state dict) + model.json: rebuildable without the training code."""
    from cnnflow.train.checkpoint import atomic_save

    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                out_dir / "model.pt")
    meta = {"model": model_cfg, "dataset_version": manifest["dataset_version"],
            "classes": manifest["classes"], "image_shape": manifest["image_shape"],
            "normalize": manifest["normalize"]}
    _write_json(out_dir / "model.json", meta)
