"""The epoch loop, its metrics and this run's checkpointer, in one process with fakes
where a real strategy or data set adds nothing."""

from __future__ import annotations

import pytest
import torch

from cnnflow.config import CheckpointConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from cnnflow.distributed.env import DistEnv
from cnnflow.distributed.mesh import Degrees
from cnnflow.distributed.strategy import Strategy
from cnnflow.errors import CheckpointMismatchError
from cnnflow.models import build_model
from cnnflow.train import loop
from cnnflow.train import metrics as m
from cnnflow.train.checkpoint import Checkpointer, TrainState
from cnnflow.train.epochs import EpochLoop
from cnnflow.train.resume import CheckpointIdentity, TrainCheckpointer


class _Comm:
    def pop(self) -> float:
        return 0.25


class _Strategy:
    """Loss 1/step, 3 of 4 samples right, on one rank."""

    loss_ranks = 1

    def __init__(self):
        self.comm, self.steps, self.after = _Comm(), [], []

    def train_step(self, micro, step):
        self.steps.append((step, micro))
        return 1.0 / (step + 1), 3, 4

    def after_step(self, step):
        self.after.append(step)


class _Data:
    steps_per_epoch = 4

    def __init__(self):
        self.calls = []

    def epoch(self, epoch, start_step=0):
        self.calls.append((epoch, start_step))
        for i in range(start_step, self.steps_per_epoch):
            yield [(epoch, i)]


class _Checkpoints:
    def __init__(self, every):
        self.every, self.marked, self.saved = every, [], []

    def due(self, step):
        return step % self.every == 0

    def mark(self, step):
        self.marked.append(step)

    def save(self, state):
        self.saved.append((state.step, state.epoch, len(state.history)))


class _Metrics:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((dict(metrics), step))


def _loop(total_steps, log_every=3, every=2, epochs=2):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    parts = _Strategy(), _Data(), _Checkpoints(every), _Metrics()
    epochs_loop = EpochLoop(parts[0], optimizer, scheduler, data=parts[1],
                            validate=lambda: {"loss": 0.5, "accuracy": 0.9},
                            checkpointer=parts[2], tracker=parts[3],
                            config=TrainConfig(epochs=epochs, log_every=log_every),
                            total_steps=total_steps, distributed=False, is_main=True)
    return epochs_loop, parts


def test_loop_logs_step_and_epoch_metrics_under_separate_names():
    epochs_loop, (strategy, data, ckpt, tracker) = _loop(total_steps=8)
    state = TrainState()
    epochs_loop.run(state)
    assert (state.step, state.epoch, state.batch_in_epoch) == (8, 2, 0)
    assert [s for s, _ in strategy.steps] == list(range(8)) and strategy.after == [*range(1, 9)]
    step_calls = [(c, s) for c, s in tracker.calls if "train/step_loss" in c]
    epoch_calls = [(c, s) for c, s in tracker.calls if "val/accuracy" in c]
    assert [s for _, s in step_calls] == [3, 6, 8]  # every log_every steps and the last
    assert [s for _, s in epoch_calls] == [4, 8]  # at the step count of the epoch's end
    assert len(step_calls) + len(epoch_calls) == len(tracker.calls)
    assert all(tuple(c) == m.STEP_METRICS for c, _ in step_calls)
    assert all(tuple(c) == m.EPOCH_METRICS for c, _ in epoch_calls)
    assert step_calls[0][0]["train/step_loss"] == pytest.approx(1 / 3)  # step index 2
    first = epoch_calls[0][0]
    assert first["train/epoch_loss"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert first["train/accuracy"] == 0.75 and first["val/accuracy"] == 0.9
    assert first["perf/comm_s"] == 0.25 and first["perf/step_time_s"] > 0
    # history rows: the metrics.jsonl columns, val accuracy under "val_accuracy"
    assert [(r["epoch"], r["step"], r["val_accuracy"]) for r in state.history] == [
        (0, 4, 0.9), (1, 8, 0.9)]
    assert ckpt.marked == list(range(1, 9))
    # every 2 steps, and at each epoch's end after the epoch count moved on
    assert ckpt.saved == [(2, 0, 0), (4, 0, 0), (4, 1, 1), (6, 1, 1), (8, 1, 1), (8, 2, 2)]


def test_loop_resumes_mid_epoch_and_stops_at_total_steps():
    epochs_loop, (strategy, data, ckpt, tracker) = _loop(total_steps=7, every=100)
    state = TrainState(step=5, epoch=1, batch_in_epoch=1, history=[{"epoch": 0}])
    epochs_loop.run(state)
    assert data.calls == [(1, 1)]
    assert [micro for _, micro in strategy.steps] == [[(1, 1)], [(1, 2)]]
    # cut short: the epoch is reported but not complete, so a rerun continues it
    assert (state.step, state.epoch, state.batch_in_epoch) == (7, 1, 3)
    assert state.history[-1]["epoch"] == 1 and state.history[-1]["step"] == 7
    assert ckpt.saved == [(7, 1, 2)]


def test_epoch_metrics_divide_by_steps_and_loss_ranks():
    meter = m.EpochMeter()
    meter.add(2.0, 3, 4, data_s=0.5, compute_s=1.0)
    meter.add(4.0, 1, 4, data_s=0.5, compute_s=1.0)
    values = m.epoch_metrics(meter, val={"loss": 1.0, "accuracy": 0.5}, lr=0.1, wall_s=2.0,
                             comm_s=0.0, loss_ranks=2)
    assert values["train/epoch_loss"] == pytest.approx(6.0 / (2 * 2))
    assert values["train/accuracy"] == pytest.approx(0.5)
    assert values["perf/samples_per_s"] == pytest.approx(4.0)
    assert values["perf/step_time_s"] == pytest.approx(1.0)
    assert (values["perf/data_s"], values["perf/compute_s"]) == (1.0, 2.0)
    assert m.mean_over_ranks(0.5, False, 4) == 0.5


# ---------------------------------------------------------------- the real checkpointer


def _run_parts(tmp_path, **ckpt):
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=2, width=8, norm="group", groups=4),
                        in_shape=(8, 8, 1), num_classes=10)
    strategy = Strategy(model, DistEnv(), Degrees(dp=1, pp=1, fsdp=1),
                        parallel=ParallelConfig(), train=TrainConfig())
    oc = OptimConfig(momentum=0.9)
    optimizer = loop.build_optimizer(strategy.parameters(), oc, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    identity = CheckpointIdentity({"name": "small_cnn"}, "v1", {"optim.lr": 0.1})
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), **ckpt)
    checkpointer = TrainCheckpointer(Checkpointer(cfg.dir, cfg.keep), strategy, optimizer,
                                     scheduler, env=DistEnv(), config=cfg, identity=identity)
    return strategy, optimizer, scheduler, checkpointer


def _one_step(strategy, optimizer, scheduler):
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    optimizer.zero_grad()
    strategy.train_step([(x, y)], 0)
    optimizer.step()
    scheduler.step()


def test_checkpointer_payload_and_bitwise_resume(tmp_path):
    strategy, optimizer, scheduler, checkpointer = _run_parts(tmp_path)
    assert checkpointer.resume() is None  # nothing to resume yet
    _one_step(strategy, optimizer, scheduler)
    state = TrainState(step=1, batch_in_epoch=1, history=[{"epoch": 0, "val_accuracy": 0.1}])
    meta = checkpointer.meta(state)
    assert list(meta) == ["scheduler", "state", "rng", "model_config", "dataset_version",
                          "world_size", "trajectory"]
    assert meta["state"]["history"] == state.history and len(meta["rng"]) == 1
    checkpointer.save(state)
    payload = torch.load(tmp_path / "ckpt" / "step-00000001.pt", weights_only=False)
    assert {"model", "optimizer"} <= payload.keys() and payload["dataset_version"] == "v1"
    expected = torch.rand(3)  # what the RNG gives right after the checkpoint

    fresh = _run_parts(tmp_path)
    resumed = fresh[3].resume()
    assert resumed == state
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(strategy.module.state_dict().values(),
                    fresh[0].module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh[1].state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert fresh[2].last_epoch == scheduler.last_epoch == 1


def test_checkpointer_refuses_another_identity_and_moves_aside_when_fresh(tmp_path):
    strategy, optimizer, scheduler, checkpointer = _run_parts(tmp_path, every_steps=2)
    assert checkpointer.due(4) and not checkpointer.due(3)
    checkpointer.save(TrainState(step=3))
    other = _run_parts(tmp_path)[3]
    other.identity = CheckpointIdentity({"name": "resnet20"}, "v1", {"optim.lr": 0.1})
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint of model \(name=small_cnn"):
        other.resume()
    assert _run_parts(tmp_path, fresh=True)[3].resume() is None
    assert not (tmp_path / "ckpt").exists()
    assert len(list(tmp_path.glob("ckpt.old-*"))) == 1
