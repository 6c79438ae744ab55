"""The Tracker interface the trainer talks to; it knows nothing of MLflow.

    Tracker          the protocol: params, tags, metrics, artifacts, dataset, model, close
    NullTracker      logs nothing (ranks > 0, tracking off, tests)
    FanOutTracker    sends every call to several trackers (the run's files + MLflow)

Only global rank 0 gets a real tracker; every other rank gets `NullTracker`, so the
training code never checks ranks before logging, and every tracker has every method, so
no caller asks `hasattr`. `cnnflow.tracking.mlflow_run.MlflowTracker` is the MLflow
implementation, `cnnflow.tracking.files.FileTracker` the train.out_dir one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    @property
    def run_id(self) -> str | None:
        """The tracking run's id; None when the tracker records no run."""
        ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dataset(self, shards: str | Path, context: str = "train") -> None:
        """Record the shard set at `shards` as an input of the run (`context`: its role)."""
        ...

    def log_model(self, model_dir: str | Path, name: str = "model") -> Any:
        """Record the model saved in `model_dir` (model.pt + model.json); the tracker's
        model record (MLflow: a ModelInfo), or None when it keeps none."""
        ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Logs nothing; what ranks > 0 and tests use."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, shards: str | Path, context: str = "train") -> None:
        pass

    def log_model(self, model_dir: str | Path, name: str = "model") -> None:
        return None

    def close(self, status: str = "FINISHED") -> None:
        pass


class FanOutTracker:
    """Every call goes to each tracker in order; `log_model` and `run_id` answer with the
    first tracker that has something (the others record nothing of their own)."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    @property
    def run_id(self) -> str | None:
        return next((t.run_id for t in self.trackers if t.run_id is not None), None)

    def log_params(self, params: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        for tracker in self.trackers:
            tracker.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path, artifact_path)

    def log_dataset(self, shards: str | Path, context: str = "train") -> None:
        for tracker in self.trackers:
            tracker.log_dataset(shards, context)

    def log_model(self, model_dir: str | Path, name: str = "model") -> Any:
        results = [tracker.log_model(model_dir, name) for tracker in self.trackers]
        return next((r for r in results if r is not None), None)

    def close(self, status: str = "FINISHED") -> None:
        for tracker in self.trackers:
            tracker.close(status)
