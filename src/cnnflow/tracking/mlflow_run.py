"""One MLflow run behind the `Tracker` interface, and the shard set as an MLflow input.

    tracker = MlflowTracker(run_id, tracking_uri=uri, parent_run_id=parent)
    tracker.log_metrics({"train/step_loss": 0.3}, step=10)
    tracker.close("FINISHED")

`cnnflow.tracking.mlflow_tracker.stage_run` opens the run and builds the tracker. Once a
run has started, an MLflow error never stops training: the tracker warns once and spools
every later call to a local directory (`cnnflow.tracking.sync`), uploaded by `sync`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from cnnflow.tracking.lineage import stringify
from cnnflow.tracking.sync import BATCH, Spool, upload

log = logging.getLogger("cnnflow")

ERROR_TAG = "cnnflow.error"


def dataset_input(manifest: dict[str, Any], source: str, context: str):
    """The shard set as an `mlflow.data` MetaDataset: no data copied, digest = version.

    MLflow caps a dataset digest at 36 characters, so the digest is the version's first
    36 hex digits (144 bits); the full version is the run tag `cnnflow.dataset_version`.
    """
    import numpy as np
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types.schema import Schema, TensorSpec

    h, w, c = manifest["image_shape"]
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, c, h, w), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    version = manifest["dataset_version"]
    if "://" not in source:
        source = Path(source).resolve().as_uri()
    # HTTPDatasetSource is the generic "a URL" source; file:// URLs are recorded as given
    ds = MetaDataset(HTTPDatasetSource(source), name=f"shards-{version[:12]}",
                     digest=version[:36], schema=schema)
    return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


class MlflowTracker:
    """One MLflow run, behind the `Tracker` interface."""

    def __init__(self, run_id: str, *, tracking_uri: str, spool_dir: str | Path | None = None,
                 log_system_metrics: bool = False, meta: dict[str, Any] | None = None,
                 parent_run_id: str | None = None, summary_run_id: str | None = None,
                 close_parent: bool = False) -> None:
        from mlflow import MlflowClient

        self.run_id, self.tracking_uri = run_id, tracking_uri
        self.parent_run_id, self._close_parent = parent_run_id, close_parent
        # where the pipeline's result goes: the parent, or (under KFP's MLflow plugin,
        # whose task run is the parent) the pipeline's run above it
        self.summary_run_id = summary_run_id or parent_run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.spool_dir = Path(spool_dir or Path("mlflow-spool") / run_id).resolve()
        self._meta = {"run_id": run_id, "tracking_uri": tracking_uri, **(meta or {})}
        self.spool: Spool | None = None  # set once MLflow failed: every later call goes here
        self._monitor = None
        if log_system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # 10 s samples, logged every 6: a minute of CPU/memory/disk/network per point
            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=10,
                                                 samples_before_logging=6,
                                                 tracking_uri=tracking_uri)
            self._monitor.start()

    @property
    def buffering(self) -> bool:
        return self.spool is not None

    def _do(self, call, kind: str, **payload: Any) -> None:
        """Run an MLflow call; on the first failure switch to the spool for good."""
        if self.spool is None:
            try:
                call()
                return
            except Exception as exc:  # noqa: BLE001 - any MLflow/network error; training goes on
                self._start_spooling(exc)
        assert self.spool is not None
        if kind == "artifact":
            payload["file"] = self.spool.keep(payload.pop("path"))
        elif kind == "model":
            payload["file"] = self.spool.keep_model(payload.pop("path"))
        self.spool.write(kind, **payload)

    def _start_spooling(self, exc: Exception) -> None:
        self.spool = Spool(self.spool_dir, self._meta)
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc)
        log.warning("MLflow at %s failed (%s); training continues and tracking is spooled "
                    "to %s; upload it later with `cnnflow tracking sync %s`",
                    self.tracking_uri, reason, self.spool_dir, self.spool_dir)
        if self._monitor is not None:
            self._monitor._shutdown_event.set()  # no finish(): it would retry the dead server
            self._monitor = None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = stringify(params)
        items = [Param(k, v) for k, v in values.items()]
        self._do(lambda: [self.client.log_batch(self.run_id, params=items[i:i + BATCH])
                          for i in range(0, len(items), BATCH)], "params", params=values)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        values = stringify(tags)
        items = [RunTag(k, v) for k, v in values.items()]
        self._do(lambda: [self.client.log_batch(self.run_id, tags=items[i:i + BATCH])
                          for i in range(0, len(items), BATCH)], "tags", tags=values)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # ms since the epoch, MLflow's metric timestamp
        values = {k: float(v) for k, v in metrics.items()}
        items = [Metric(k, v, now, step) for k, v in values.items()]
        self._do(lambda: self.client.log_batch(self.run_id, metrics=items), "metrics",
                 metrics=values, step=step, timestamp_ms=now)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._do(lambda: upload(self.client, self.run_id, path, artifact_path), "artifact",
                 path=str(path), artifact_path=artifact_path)

    def fail(self, error: str) -> None:
        """Record a failure's one-line error on this run and on its parent."""
        line = (error.strip().splitlines() or [""])[0][:500]
        self.set_tags({ERROR_TAG: line})
        if self.parent_run_id and self.spool is None:
            with contextlib.suppress(Exception):
                self.client.set_tag(self.parent_run_id, ERROR_TAG, line)

    def summarize_parent(self, *, params: dict[str, Any], metrics: dict[str, float],
                         tags: dict[str, str]) -> None:
        """The pipeline's result on its parent run (key params, test metrics, decision,
        registered version), so that comparing pipeline runs in the UI shows them."""
        if not self.summary_run_id or self.spool is not None:
            return
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        with contextlib.suppress(Exception):  # the stage's own record is what counts
            existing = self.client.get_run(self.summary_run_id).data.params
            self.client.log_batch(
                self.summary_run_id,
                params=[Param(k, v) for k, v in stringify(params).items() if k not in existing],
                metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                tags=[RunTag(k, v) for k, v in stringify(tags).items()])

    def log_model_metrics(self, model_id: str, metrics: dict[str, float],
                          shards: str | Path) -> None:
        """`metrics` on this run, linked to the logged model `model_id` and to the shard
        set they were measured on (MLflow 3's LoggedModel metrics)."""
        from mlflow.entities import Metric

        from cnnflow.data.manifest import read_manifest

        version = read_manifest(shards)["dataset_version"]
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0, model_id=model_id,
                        dataset_name=f"shards-{version[:12]}", dataset_digest=version[:36])
                 for k, v in metrics.items()]
        self._do(lambda: self.client.log_batch(self.run_id, metrics=items), "metrics",
                 metrics={k: float(v) for k, v in metrics.items()}, step=0, timestamp_ms=now)

    def log_dataset(self, shards: str | Path, context: str = "train") -> None:
        """Dataset lineage: the shard set (digest = dataset version) as a run input."""
        from cnnflow.data.manifest import read_manifest

        manifest = read_manifest(shards)
        self._do(lambda: self.client.log_inputs(
            self.run_id, datasets=[dataset_input(manifest, str(shards), context)]),
            "dataset", manifest=manifest, source=str(shards), context=context)

    def log_model(self, model_dir: str | Path, name: str = "model"):
        """Log the train output's model (see cnnflow.tracking.registry) and model.json; the
        ModelInfo, or None when it was spooled."""
        from cnnflow.tracking.registry import log_model

        result: list = []
        self.log_artifact(Path(model_dir) / "model.json")
        self._do(lambda: result.append(log_model(model_dir, run_id=self.run_id,
                                                 tracking_uri=self.tracking_uri, name=name)),
                 "model", path=str(model_dir), name=name)
        return result[0] if result else None

    def close(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
            self._monitor = None
        self._do(lambda: self.client.set_terminated(self.run_id, status), "status",
                 status=status)
        if self._close_parent and self.parent_run_id and self.spool is None:
            with contextlib.suppress(Exception):  # the stage's own record is what counts
                self.client.set_terminated(self.parent_run_id, status)
        if self.spool is not None:
            log.warning("MLflow run %s was spooled to %s; upload it with "
                        "`cnnflow tracking sync %s`", self.run_id, self.spool_dir,
                        self.spool_dir)
