"""The tracker protocol's implementations: FileTracker rows and files, fan-out, null."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from cnnflow.tracking import FanOutTracker, FileTracker, NullTracker, Tracker
from cnnflow.tracking.files import EPOCH_COLUMNS, STEP_COLUMNS
from cnnflow.train.metrics import EPOCH_METRICS, STEP_METRICS

EPOCH = {name: float(i) for i, name in enumerate(EPOCH_METRICS)}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_file_tracker_writes_a_steps_row_and_an_epoch_row_under_the_old_columns(tmp_path):
    epoch = [3]
    files = FileTracker(tmp_path / "out", current_epoch=lambda: epoch[0], fresh=True)
    files.log_metrics({"train/step_loss": 0.5, "train/lr": 0.1}, 30)
    files.log_metrics(EPOCH, 32)
    epoch[0] = 4
    files.log_metrics({"train/step_loss": 0.25, "train/lr": 0.05}, 40)
    files.log_metrics({"something/else": 1.0}, 40)  # not a row of either file
    files.log_metrics({}, 40)
    steps = _rows(tmp_path / "out" / "steps.jsonl")
    assert steps == [{"step": 30, "epoch": 3, "loss": 0.5, "lr": 0.1},
                     {"step": 40, "epoch": 4, "loss": 0.25, "lr": 0.05}]
    assert list(steps[0]) == ["step", "epoch", "loss", "lr"]
    (row,) = _rows(tmp_path / "out" / "metrics.jsonl")
    assert list(row) == ["epoch", "step", "loss", "train_accuracy", "val_loss", "val_accuracy",
                         "lr", "samples_per_s", "step_time_s", "data_s", "compute_s", "comm_s"]
    assert (row["epoch"], row["step"]) == (3, 32)
    assert row["val_accuracy"] == EPOCH["val/accuracy"]
    assert row["loss"] == EPOCH["train/epoch_loss"] and row["lr"] == EPOCH["train/epoch_lr"]


def test_file_tracker_starts_fresh_or_appends(tmp_path):
    for name in ("steps.jsonl", "metrics.jsonl", "summary.json"):
        (tmp_path / name).write_text('{"old": 1}\n')
    FileTracker(tmp_path, current_epoch=lambda: 0, fresh=False).log_metrics(
        {"train/step_loss": 1.0, "train/lr": 0.1}, 1)
    assert len(_rows(tmp_path / "steps.jsonl")) == 2  # a resumed run continues its curves
    FileTracker(tmp_path, current_epoch=lambda: 0, fresh=True)
    assert not any((tmp_path / n).exists() for n in ("steps.jsonl", "metrics.jsonl",
                                                     "summary.json"))


def test_file_tracker_writes_model_and_summary(tmp_path):
    files = FileTracker(tmp_path, current_epoch=lambda: 0, fresh=True)
    state = {"w": torch.arange(4.0)}
    path = files.save_model(state, {"model": {"name": "small_cnn"}, "classes": ["a"]})
    files.log_summary({"steps": 2, "history": [{"val_accuracy": 0.5}]})
    assert path == tmp_path / "model.pt"
    assert torch.equal(torch.load(path)["w"], state["w"])
    assert json.loads((tmp_path / "model.json").read_text())["model"] == {"name": "small_cnn"}
    assert json.loads((tmp_path / "summary.json").read_text())["history"][-1] == {
        "val_accuracy": 0.5}
    assert files.log_model(tmp_path) is None and files.run_id is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt",
                                                          "summary.json"]


def test_the_columns_cover_exactly_the_trainer_metrics():
    assert tuple(STEP_COLUMNS) == STEP_METRICS
    assert tuple(EPOCH_COLUMNS) == EPOCH_METRICS
    assert not set(STEP_METRICS) & set(EPOCH_METRICS)


class _Recorder:
    """A tracker that lists the calls it got."""

    def __init__(self, run_id=None, model=None):
        self.run_id, self.model, self.calls = run_id, model, []

    def log_params(self, params):
        self.calls.append(("log_params", params))

    def set_tags(self, tags):
        self.calls.append(("set_tags", tags))

    def log_metrics(self, metrics, step):
        self.calls.append(("log_metrics", metrics, step))

    def log_artifact(self, path, artifact_path=None):
        self.calls.append(("log_artifact", path, artifact_path))

    def log_dataset(self, shards, context="train"):
        self.calls.append(("log_dataset", shards, context))

    def log_model(self, model_dir, name="model"):
        self.calls.append(("log_model", model_dir, name))
        return self.model

    def close(self, status="FINISHED"):
        self.calls.append(("close", status))


def test_fan_out_sends_every_call_to_every_tracker_in_order():
    a, b = _Recorder(), _Recorder(run_id="r1", model="info")
    fan = FanOutTracker(a, b)
    fan.log_params({"x": 1})
    fan.set_tags({"t": "v"})
    fan.log_metrics({"m": 1.0}, 3)
    fan.log_artifact("f.txt", "dir")
    fan.log_dataset("shards", "train")
    assert fan.log_model("out", "model") == "info"  # the first tracker with a record
    fan.close("FAILED")
    assert a.calls == b.calls and [c[0] for c in a.calls] == [
        "log_params", "set_tags", "log_metrics", "log_artifact", "log_dataset", "log_model",
        "close"]
    assert fan.run_id == "r1"
    assert FanOutTracker(NullTracker()).run_id is None


@pytest.mark.parametrize("make", [
    lambda tmp: NullTracker(), lambda tmp: FanOutTracker(NullTracker()),
    lambda tmp: FileTracker(tmp, current_epoch=lambda: 0, fresh=True),
], ids=["null", "fan-out", "files"])
def test_every_tracker_implements_the_whole_protocol(make, tmp_path):
    tracker = make(tmp_path)
    assert isinstance(tracker, Tracker)
    assert tracker.log_dataset("shards", context="train") is None
    assert tracker.log_model("out", name="model") is None


def test_the_protocol_matches_mlflow_tracker_signatures():
    from cnnflow.tracking.mlflow_run import MlflowTracker

    for name in ("log_params", "set_tags", "log_metrics", "log_artifact", "log_dataset",
                 "log_model", "close"):
        ours = inspect.signature(getattr(Tracker, name)).parameters
        theirs = inspect.signature(getattr(MlflowTracker, name)).parameters
        assert [(p.name, p.default) for p in ours.values()] == \
            [(p.name, p.default) for p in theirs.values()], name
        for impl in (NullTracker, FanOutTracker):
            mine = inspect.signature(getattr(impl, name)).parameters
            assert [(p.name, p.default) for p in mine.values()] == \
                [(p.name, p.default) for p in ours.values()], (impl, name)
