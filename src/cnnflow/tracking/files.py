"""The training run's files in `train.out_dir`, written by a tracker beside MLflow's.

    steps.jsonl    a row per logged optimizer step: step, epoch, loss, lr
    metrics.jsonl  a row per epoch (= summary.json's history rows): epoch, step, loss,
                   train_accuracy, val_loss, val_accuracy, lr, samples_per_s, step_time_s,
                   data_s, compute_s, comm_s
    model.pt       the single-device state dict (torch.save); model.json: how to rebuild it
    summary.json   steps, epochs, history, dataset_version, world_size, strategy

`FileTracker.log_metrics` turns the trainer's metric names (`cnnflow.train.metrics`) into
these columns: a call whose names are all per-step ones becomes a steps.jsonl row, one
whose names are all per-epoch ones a metrics.jsonl row; anything else is not a row of
either file and is left to the other trackers. The column names are the files' own, kept
from before the metrics were renamed, because dvc plots, the evaluate stage, the kfp steps
and the benchmarks read them. Only global rank 0 creates a FileTracker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnflow.fileio import atomic_write, raise_storage, write_json
from cnnflow.tracking.base import NullTracker

STEP_COLUMNS = {"train/step_loss": "loss", "train/lr": "lr"}
"""Per-step metric name -> steps.jsonl column."""
EPOCH_COLUMNS = {
    "train/epoch_loss": "loss", "train/accuracy": "train_accuracy", "val/loss": "val_loss",
    "val/accuracy": "val_accuracy", "train/epoch_lr": "lr",
    "perf/samples_per_s": "samples_per_s", "perf/step_time_s": "step_time_s",
    "perf/data_s": "data_s", "perf/compute_s": "compute_s", "perf/comm_s": "comm_s",
}
"""Per-epoch metric name -> metrics.jsonl (and history) column."""


def step_row(metrics: dict[str, float], *, step: int, epoch: int) -> dict[str, Any]:
    """The steps.jsonl row of one optimizer step's metrics."""
    return {"step": step, "epoch": epoch, **{STEP_COLUMNS[k]: v for k, v in metrics.items()}}


def epoch_row(metrics: dict[str, float], *, epoch: int, step: int) -> dict[str, Any]:
    """The metrics.jsonl row (and summary.json history row) of one epoch's metrics."""
    return {"epoch": epoch, "step": step,
            **{EPOCH_COLUMNS[k]: v for k, v in metrics.items()}}


class FileTracker(NullTracker):
    """Writes train.out_dir's files; params, tags, artifacts, datasets and `log_model`
    record nothing here (the model files come from `save_model`).

    `current_epoch()` is the epoch the rows belong to (the trainer's `TrainState.epoch`:
    per-step metrics carry no epoch of their own). `fresh`: a run that resumed no
    checkpoint starts the JSONL files and summary.json empty instead of appending.
    """

    STEPS, EPOCHS, SUMMARY = "steps.jsonl", "metrics.jsonl", "summary.json"
    MODEL, MODEL_META = "model.pt", "model.json"

    def __init__(self, out_dir: str | Path, *, current_epoch: Callable[[], int],
                 fresh: bool) -> None:
        self.out_dir = Path(out_dir)
        self.current_epoch = current_epoch
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if fresh:  # no curves of an earlier run in this run's files
            for stale in (self.EPOCHS, self.STEPS, self.SUMMARY):
                (self.out_dir / stale).unlink(missing_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        names = metrics.keys()
        if names and names <= STEP_COLUMNS.keys():
            self._append(self.STEPS, step_row(metrics, step=step, epoch=self.current_epoch()))
        elif names and names <= EPOCH_COLUMNS.keys():
            self._append(self.EPOCHS, epoch_row(metrics, epoch=self.current_epoch(),
                                                step=step))

    def _append(self, name: str, row: dict[str, Any]) -> None:
        try:
            with open(self.out_dir / name, "a") as fh:  # a line per call: complete if killed
                fh.write(json.dumps(row) + "\n")
        except OSError as exc:
            raise_storage(exc, f"appending to {self.out_dir / name}")
            raise

    def save_model(self, state_dict: dict[str, Any], meta: dict[str, Any]) -> Path:
        """model.pt (the single-device state dict) + model.json (`meta`: model config,
        dataset version, classes, image shape, normalisation): rebuildable without the
        training code, whatever the parallelism was. Returns model.pt's path."""
        import torch

        path = self.out_dir / self.MODEL
        atomic_write(path, lambda f: torch.save(state_dict, f), what="model")
        write_json(self.out_dir / self.MODEL_META, meta)
        return path

    def log_summary(self, summary: dict[str, Any]) -> None:
        """summary.json: steps, epochs, history, dataset_version, world_size, strategy."""
        write_json(self.out_dir / self.SUMMARY, summary)
