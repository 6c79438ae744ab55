"""A local spool for tracking calls that could not reach MLflow, and its replay.

When the tracking server goes away mid-run, `MlflowTracker` keeps training going and
writes every later call here instead:

    <spool>/meta.json       where the run was headed: tracking URI, experiment, run id
    <spool>/events.jsonl    one JSON object per call, in order (params, tags, metrics with
                            their original step and timestamp, artifacts, datasets,
                            models, the final status)
    <spool>/files/<n>/...   copies of logged artifact files and model directories

    cnnflow tracking sync outputs/train/mlflow-spool            # then, once it is back

`sync` replays the events into the original run when the target store still has it (the
same server restarted), else into a new run of the same experiment tagged with the
original id. A finished sync writes `synced.json`; syncing again is refused, because
metrics would be logged twice.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import time
from pathlib import Path
from typing import Any

from cnnflow.errors import CnnflowError

log = logging.getLogger("cnnflow")

EVENTS, META, DONE = "events.jsonl", "meta.json", "synced.json"
BATCH = 100  # MLflow's per-request limit for params and tags (metrics allow 1000)


class Spool:
    """Append-only event log of one run; every write is flushed (a crash loses nothing
    that was written before it)."""

    def __init__(self, directory: str | Path, meta: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / META
        if not meta_path.exists():
            meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self._files = len(list((self.dir / "files").glob("*"))) if (self.dir / "files"
                                                                      ).is_dir() else 0

    def write(self, kind: str, **payload: Any) -> None:
        event = {"kind": kind, "time_ms": int(time.time() * 1000), **payload}
        with open(self.dir / EVENTS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def keep(self, path: str | Path) -> str:
        """Copy a file or directory into the spool; return its path relative to the spool."""
        src = Path(path)
        rel = Path("files") / f"{self._files:06d}" / src.name
        self._files += 1
        dst = self.dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return rel.as_posix()

    def keep_model(self, model_dir: str | Path) -> str:
        """Copy only model.pt + model.json of a train output dir (not its traces)."""
        rel = Path("files") / f"{self._files:06d}" / "model"
        self._files += 1
        (self.dir / rel).mkdir(parents=True)
        for name in ("model.pt", "model.json"):
            shutil.copy2(Path(model_dir) / name, self.dir / rel / name)
        return rel.as_posix()


def read_events(spool_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    root = Path(spool_dir)
    try:
        meta = json.loads((root / META).read_text())
    except (OSError, ValueError):
        raise CnnflowError(f"{root}: not a tracking spool (no readable {META})") from None
    events = []
    path = root / EVENTS
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                # a line cut short by a crash mid-write: everything before it is intact
                log.warning("%s line %d: incomplete event skipped", path, number)
    return meta, events


def _target_run(client, meta: dict[str, Any]) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(meta["run_id"]).info.run_id
    except MlflowException:
        pass
    from cnnflow.tracking.mlflow_tracker import ensure_experiment

    experiment_id = ensure_experiment(client, meta.get("experiment_name") or "cnnflow")
    tags = dict(meta.get("tags") or {})
    tags["cnnflow.synced_from_run_id"] = meta["run_id"]
    run = client.create_run(experiment_id, run_name=meta.get("run_name"), tags=tags)
    return run.info.run_id


def sync(spool_dir: str | Path, tracking_uri: str | None = None) -> str:
    """Replay a spool into MLflow; return the run id it landed in."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from cnnflow.tracking.mlflow_tracker import check_reachable, resolve_tracking_uri

    root = Path(spool_dir)
    if (root / DONE).exists():
        done = json.loads((root / DONE).read_text())
        raise CnnflowError(f"{root}: already synced into run {done['run_id']} "
                           f"at {done['tracking_uri']}; delete {DONE} to sync again")
    meta, events = read_events(root)
    uri = resolve_tracking_uri(tracking_uri or meta.get("tracking_uri"))
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = _target_run(client, meta)
    status = None
    for event in events:
        kind = event["kind"]
        if kind == "params":
            items = [Param(k, v) for k, v in event["params"].items()]
            for i in range(0, len(items), BATCH):
                client.log_batch(run_id, params=items[i:i + BATCH])
        elif kind == "tags":
            items = [RunTag(k, v) for k, v in event["tags"].items()]
            for i in range(0, len(items), BATCH):
                client.log_batch(run_id, tags=items[i:i + BATCH])
        elif kind == "metrics":
            client.log_batch(run_id, metrics=[
                Metric(k, float(v), event["timestamp_ms"], event["step"])
                for k, v in event["metrics"].items()])
        elif kind == "artifact":
            upload(client, run_id, root / event["file"], event.get("artifact_path"))
        elif kind == "dataset":
            from cnnflow.tracking.mlflow_tracker import dataset_input

            client.log_inputs(run_id, datasets=[dataset_input(event["manifest"],
                                                              event["source"],
                                                              event["context"])])
        elif kind == "model":
            from cnnflow.tracking.registry import log_model

            log_model(root / event["file"], run_id=run_id, tracking_uri=uri,
                      name=event["name"])
        elif kind == "status":
            status = event["status"]
    if status:
        client.set_terminated(run_id, status)
    (root / DONE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri,
                                         "events": len(events)}) + "\n")
    log.info("synced %d events from %s into run %s at %s", len(events), root, run_id, uri)
    return run_id


def upload(client, run_id: str, path: str | Path, artifact_path: str | None) -> None:
    """Like `mlflow.log_artifact`: a file lands as <artifact_path>/<name>, a directory's
    contents under <artifact_path>/<dir name>."""
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), posixpath.join(artifact_path or "", path.name))
    else:
        client.log_artifact(run_id, str(path), artifact_path)
