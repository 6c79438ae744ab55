"""Wire the pieces: process group, data streams, model, parallelism, checkpoints, tracker.

`train(params)` runs identically in one process, under torchrun and in a PyTorchJob pod;
only global rank 0 writes outputs, checkpoints and tracker entries. It resumes from the
newest complete checkpoint by itself, so a restarted worker (torchrun --max-restarts, a
PyTorchJob restartPolicy) continues where the job left off; SIGTERM (preemption) or
SIGINT finishes the step, checkpoints and exits 143/130 (`train.preempt`). How the model
is spread over the ranks (DDP, FSDP/HSDP, pipeline, dp x pp) is
`distributed.parallelize`'s business: the trainer drives a `Strategy` and always writes a
single-device model.pt.

This module only wires; each piece takes its own config sections:

    train.data         open_shards, train_streams       (TrainConfig)
    distributed        parallelize -> Strategy           (ParallelConfig, TrainConfig)
    train.loop         optimizer, lr schedule            (OptimConfig)
    train.resume       TrainCheckpointer: payload, save, resume   (CheckpointConfig)
    train.epochs       EpochLoop: steps, metrics, checkpoints     (TrainConfig)
    tracking.files     FileTracker: train.out_dir's files (rank 0), beside the caller's
                       tracker (MLflow from cnnflow.stages.run_train) via FanOutTracker

The run's params and lineage tags are logged by whoever opened the tracker's run
(`cnnflow.tracking.mlflow_tracker.stage_run`); the trainer adds only what it alone
knows, `cnnflow.parallel.strategy`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from cnnflow.config import OptimConfig, Params, TrainConfig
from cnnflow.distributed.env import DistEnv, init_distributed, lost_contact, shutdown
from cnnflow.distributed.mesh import resolve_degrees
from cnnflow.distributed.parallelize import log_plan, parallelize
from cnnflow.distributed.strategy import Strategy
from cnnflow.errors import CnnflowError
from cnnflow.models import build_model, count_parameters, model_config_dict, model_from_config_dict
from cnnflow.tracking import FanOutTracker, FileTracker, NullTracker, Tracker
from cnnflow.train import loop
from cnnflow.train.checkpoint import Checkpointer, TrainState, deferred_sigint, trajectory_config
from cnnflow.train.data import ShardSet, open_shards, train_streams
from cnnflow.train.epochs import EpochLoop
from cnnflow.train.preempt import StopSignal
from cnnflow.train.profiling import start_profiler
from cnnflow.train.resume import CheckpointIdentity, TrainCheckpointer

log = logging.getLogger("cnnflow")


def train(params: Params, *, tracker: Tracker | None = None, env: DistEnv | None = None
          ) -> dict[str, Any]:
    """Train `params.model` on `params.train.shards`; return the final summary."""
    tc, pc = params.train, params.parallel
    stop = StopSignal(params.checkpoint.preempt_budget_s)
    with stop.installed():  # SIGTERM/SIGINT: finish the step, checkpoint, exit (preempt)
        env = env or init_distributed(pc.backend, pc.init_timeout_s, tc.threads)
        try:
            return _train(params, env, tracker if env.is_main and tracker else NullTracker(),
                          stop)
        except RuntimeError as exc:  # gloo's transport errors are bare RuntimeErrors
            lost = lost_contact(exc, env, pc.init_timeout_s)
            if lost is None:
                raise
            raise lost from None
        finally:
            shutdown()


def _train(params: Params, env: DistEnv, tracker: Tracker, stop: StopSignal
           ) -> dict[str, Any]:
    tc, cc = params.train, params.checkpoint
    degrees = resolve_degrees(params.parallel, env.world_size, env.rank)
    shards = open_shards(tc.shards or params.shard.out_dir, tc.dataset_version)
    data = train_streams(shards, tc, rank=degrees.data_rank, world_size=degrees.data_world)
    model_cfg = model_config_dict(params.model, shards.in_shape, shards.num_classes)
    strategy, n_params = _build_strategy(params, env, shards)
    total_steps = _total_steps(tc, data.steps_per_epoch)
    optimizer, scheduler = _optimization(strategy, params.optim, tc, total_steps,
                                         data.steps_per_epoch)
    trajectory = trajectory_config(optim=params.optim, train=tc, parallel=params.parallel,
                                   streams=data.streams)
    checkpointer = TrainCheckpointer(
        Checkpointer(cc.dir, cc.keep, enabled=env.is_main), strategy, optimizer, scheduler,
        env=env, config=cc, identity=CheckpointIdentity(model_cfg, shards.version, trajectory))
    resumed = checkpointer.resume()
    state = resumed or TrainState()
    strategy.finish()
    log_plan(strategy, optimizer)

    files = None
    if env.is_main:
        files = FileTracker(tc.out_dir, current_epoch=lambda: state.epoch,
                            fresh=resumed is None)
        tracker = FanOutTracker(files, tracker)
        log.info("training %s (%d parameters) on %s: %d ranks (%s), %d streams, global batch "
                 "%d, %d steps/epoch, %d steps", params.model.name, n_params, shards.path,
                 env.world_size, strategy.name, data.streams, tc.batch_size,
                 data.steps_per_epoch, total_steps)
    tracker.set_tags({"cnnflow.parallel.strategy": strategy.name})
    epochs = EpochLoop(
        strategy, optimizer, scheduler, data=data, checkpointer=checkpointer, tracker=tracker,
        validate=lambda: strategy.evaluate(shards.val_batches(strategy.data_rank,
                                                              strategy.data_world)),
        config=tc, total_steps=total_steps, distributed=env.distributed,
        is_main=env.is_main, profiler=start_profiler(tc, env), stop=stop)
    _run(epochs, state, checkpointer)
    return _finish(strategy, state, shards, model_cfg, env, files)


def _build_strategy(params: Params, env: DistEnv, shards: ShardSet) -> tuple[Strategy, int]:
    """The seeded single-device model, parallelized; (strategy, parameter count). The
    model itself is not kept: a pipeline rank holds only its stages."""
    torch.manual_seed(params.train.seed)
    model = build_model(params.model, in_shape=shards.in_shape, num_classes=shards.num_classes)
    n_params = count_parameters(model)
    strategy = parallelize(model, env, parallel=params.parallel, train=params.train,
                           norm=params.model.norm,
                           label_smoothing=params.optim.label_smoothing,
                           in_shape=shards.in_shape)
    return strategy, n_params


def _total_steps(tc: TrainConfig, steps_per_epoch: int) -> int:
    total = steps_per_epoch * tc.epochs
    return min(total, tc.max_steps) if tc.max_steps else total


def _optimization(strategy: Strategy, oc: OptimConfig, tc: TrainConfig, total_steps: int,
                  steps_per_epoch: int):
    """(optimizer, LambdaLR scheduler) over the parameters this rank holds."""
    lr = loop.peak_lr(oc, tc.batch_size)
    optimizer = loop.build_optimizer(strategy.parameters(), oc, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: loop.lr_factor(oc, s, total_steps, steps_per_epoch))
    return optimizer, scheduler


def _run(epochs: EpochLoop, state: TrainState, checkpointer: TrainCheckpointer) -> None:
    """The epochs. SIGTERM/SIGINT end them with a checkpoint (Preempted, exit 128 + the
    signal); a second Ctrl-C becomes one line naming the checkpoint a rerun resumes from."""
    try:
        epochs.run(state)
    except KeyboardInterrupt:
        last = checkpointer.latest()
        raise CnnflowError(
            f"interrupted at step {state.step}; the last complete checkpoint "
            f"{last or '(none)'} is intact and a rerun resumes from it"
        ) from None
    finally:
        checkpointer.close()
        if epochs.profiler is not None:
            epochs.profiler.stop()


def _finish(strategy: Strategy, state: TrainState, shards: ShardSet, model_cfg: dict,
            env: DistEnv, files: FileTracker | None) -> dict[str, Any]:
    """model.pt, model.json and summary.json through `files` (rank 0); the summary, with
    the single-device model under "model" on rank 0 (None elsewhere)."""
    full = strategy.full_state_dict()  # collective for sharded strategies
    summary = {"steps": state.step, "epochs": state.epoch, "history": state.history,
               "dataset_version": shards.version, "world_size": env.world_size,
               "strategy": strategy.name}
    final = None
    if files is not None:  # global rank 0
        with deferred_sigint():  # a Ctrl-C now would tear torch.save's zip writer
            path = files.save_model(full, shards.model_meta(model_cfg))
            files.log_summary(summary)
        log.info("wrote %s", path)
        final = strategy.module if strategy.name == "ddp" else _single_device(model_cfg, full)
    if env.distributed:
        dist.barrier()
    summary["model"] = final
    return summary


def _single_device(model_cfg: dict, state_dict: dict) -> torch.nn.Module:
    model = model_from_config_dict(model_cfg)
    model.load_state_dict(state_dict, strict=True)
    return model
