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

A spool is input, not a command: the target is `--tracking-uri` or $MLFLOW_TRACKING_URI,
never the URI in `meta.json` unless `--to-recorded-uri` asks for it; and every file an
event names must resolve (symlinks followed) inside the spool directory. All events are
checked before the first call to MLflow, so a refused spool uploads nothing.
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
    meta, numbered = _read_numbered(Path(spool_dir))
    return meta, [event for _, event in numbered]


def _read_numbered(root: Path) -> tuple[dict[str, Any], list[tuple[int, dict[str, Any]]]]:
    """meta.json and the events, each with its line number in events.jsonl."""
    try:
        meta = json.loads((root / META).read_text())
    except (OSError, ValueError):
        raise CnnflowError(f"{root}: not a tracking spool (no readable {META})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("run_id"), str):
        raise CnnflowError(f"{root / META}: expected a JSON object with the spooled run's "
                           f"'run_id', got {json.dumps(meta)[:80]}")
    events = []
    path = root / EVENTS
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                # a line cut short by a crash mid-write: everything before it is intact
                log.warning("%s line %d: incomplete event skipped", path, number)
                continue
            if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
                raise CnnflowError(f"{path} line {number}: expected a JSON object with a "
                                   f"'kind', got {line.strip()[:80]!r}; nothing was uploaded")
            events.append((number, event))
    return meta, events


FILE_KINDS = ("artifact", "model")  # the events that name a file kept in the spool


def _inside(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return resolved != root and resolved.is_relative_to(root)


def spool_files(root: Path, numbered: list[tuple[int, dict[str, Any]]]) -> dict[int, Path]:
    """Check every file an event names, before anything is uploaded: it must exist and it,
    and everything under it when it is a directory, must resolve inside the spool (no
    absolute path, no `..`, no symlink out). Returns line number -> path in the spool."""
    real_root = root.resolve()
    where = root / EVENTS
    files = {}
    for number, event in numbered:
        if event["kind"] not in FILE_KINDS:
            continue
        value = event.get("file")
        if not isinstance(value, str) or not value:
            raise CnnflowError(f"{where} line {number}: {event['kind']} event has no 'file' "
                               f"(expected a path inside the spool {root}); nothing was "
                               f"uploaded")
        dest = event.get("artifact_path")
        if dest is not None and not (isinstance(dest, str) and _relative_posix(dest)):
            raise CnnflowError(f"{where} line {number}: artifact_path {dest!r} is not a "
                               f"relative path inside the run's artifacts; nothing was "
                               f"uploaded")
        path = real_root / value
        if not _inside(path, real_root):
            raise CnnflowError(f"{where} line {number}: file {value!r} is outside the spool "
                               f"{root}; nothing was uploaded")
        if not path.exists():
            raise CnnflowError(f"{where} line {number}: file {value!r} does not exist in the "
                               f"spool {root}; nothing was uploaded")
        outside = _first_outside(path, real_root) if path.is_dir() else None
        if outside is not None:
            raise CnnflowError(f"{where} line {number}: file {value!r} holds {outside!r}, "
                               f"which is outside the spool {root}; nothing was uploaded")
        files[number] = path
    return files


def _relative_posix(text: str) -> bool:
    parts = text.split("/")
    return bool(text) and not text.startswith("/") and "\\" not in text and ".." not in parts


def _first_outside(directory: Path, real_root: Path) -> str | None:
    """The first entry under `directory` (symlinked directories followed, each real one
    once) that resolves outside `real_root`, as a path relative to `directory`."""
    seen: set[Path] = set()
    stack = [(directory.resolve(), "")]
    while stack:
        real, rel = stack.pop()
        if real in seen:
            continue
        seen.add(real)
        for entry in sorted(real.iterdir()):
            inner = f"{rel}{entry.name}"
            if not _inside(entry, real_root):
                return inner
            if entry.is_dir():
                stack.append((entry.resolve(), f"{inner}/"))
    return None


def target_uri(root: Path, meta: dict[str, Any], tracking_uri: str | None,
               to_recorded_uri: bool) -> str:
    """--tracking-uri, else the spool's own URI when asked for, else $MLFLOW_TRACKING_URI."""
    recorded = meta.get("tracking_uri")
    if tracking_uri and to_recorded_uri:
        raise CnnflowError(f"--tracking-uri {tracking_uri} and --to-recorded-uri exclude each "
                           f"other: pass one")
    if tracking_uri:
        return tracking_uri
    if to_recorded_uri:
        if not isinstance(recorded, str) or not recorded:
            raise CnnflowError(f"{root / META}: no tracking_uri recorded for "
                               f"--to-recorded-uri; pass --tracking-uri URI")
        return recorded
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    own = (f", or pass --to-recorded-uri to use the one the spool recorded ({recorded})"
           if isinstance(recorded, str) and recorded else "")
    raise CnnflowError(f"{root}: no tracking URI to sync into; pass --tracking-uri URI or set "
                       f"MLFLOW_TRACKING_URI{own}")


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


def sync(spool_dir: str | Path, tracking_uri: str | None = None, *,
         to_recorded_uri: bool = False) -> str:
    """Replay a spool into MLflow; return the run id it landed in.

    The target is `tracking_uri`, else the spool's `meta.json` URI when `to_recorded_uri`,
    else $MLFLOW_TRACKING_URI; with none of them a one-line error says what to pass."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from cnnflow.tracking.mlflow_tracker import check_reachable, resolve_tracking_uri

    root = Path(spool_dir)
    if (root / DONE).exists():
        done = json.loads((root / DONE).read_text())
        raise CnnflowError(f"{root}: already synced into run {done['run_id']} "
                           f"at {done['tracking_uri']}; delete {DONE} to sync again")
    meta, numbered = _read_numbered(root)
    files = spool_files(root, numbered)  # all of them, before the first upload
    uri = resolve_tracking_uri(target_uri(root, meta, tracking_uri, to_recorded_uri))
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = _target_run(client, meta)
    status = None
    for number, event in numbered:
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
            upload(client, run_id, files[number], event.get("artifact_path"))
        elif kind == "dataset":
            from cnnflow.tracking.mlflow_run import dataset_input

            client.log_inputs(run_id, datasets=[dataset_input(event["manifest"],
                                                              event["source"],
                                                              event["context"])])
        elif kind == "model":
            from cnnflow.tracking.registry import log_model

            log_model(files[number], run_id=run_id, tracking_uri=uri,
                      name=event["name"])
        elif kind == "status":
            status = event["status"]
    if status:
        client.set_terminated(run_id, status)
    (root / DONE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri,
                                         "recorded_tracking_uri": meta.get("tracking_uri"),
                                         "events": len(numbered)}) + "\n")
    log.info("synced %d events from %s into run %s at %s", len(numbered), root, run_id, uri)
    return run_id


def upload(client, run_id: str, path: str | Path, artifact_path: str | None) -> None:
    """Like `mlflow.log_artifact`: a file lands as <artifact_path>/<name>, a directory's
    contents under <artifact_path>/<dir name>."""
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), posixpath.join(artifact_path or "", path.name))
    else:
        client.log_artifact(run_id, str(path), artifact_path)
