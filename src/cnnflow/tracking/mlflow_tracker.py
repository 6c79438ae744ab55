"""MLflow behind the `Tracker` interface: a parent run per pipeline, a child run per stage.

    parent = start_parent_run(experiment="cnnflow")   # or resume $CNNFLOW_PARENT_RUN_ID
    tracker = stage_run("train", params=flatten(params), parent_run_id=parent,
                        dataset_version=version, world_size=4, degrees={"dp": 4})
    tracker.log_metrics({"train/step_loss": 0.3}, step=10)   # an MlflowTracker (mlflow_run)
    tracker.log_model("outputs/train")
    tracker.close()

Where runs go: `tracking_uri` argument > `$MLFLOW_TRACKING_URI` > `sqlite:///mlflow/mlflow.db`
(relative to the working directory; artifacts of a sqlite store go to `artifacts/` beside
the database file). The file store is never used: MLflow 3.17 refuses it by default.

Under KFP's MLflow plugin (KFP >= 2.17, KEP-12862) the backend owns the tree: its API
server opens a parent run per pipeline run (closing it when the run ends), its driver a
nested run per task, and every step gets `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_ID`,
`MLFLOW_RUN_ID` (the task's run), `MLFLOW_WORKSPACE` and the credentials. Then
`stage_run` opens no parent: the stage's run is a child of `$MLFLOW_RUN_ID`, in its
experiment (`kfp_task_run`). Why a child and not the task run itself: the task run is
the launcher's (it logs the component's inputs and outputs there and closes it, and
closes any child left open by a crashed pod); a stage run of its own keeps the same
name, tags, status and spool as under the CLI, DVC and kfp.local, and each attempt
(a retried task, a restarted training pod) is a run of its own instead of a second
series of metrics in one. The pipeline's summary goes on the KFP parent run.

Faults: `check_reachable` fails a run with one line before training when the server
does not answer (unless `offline`, which logs to the local sqlite store). Once a run has
started, an MLflow error never stops training: the tracker warns once and spools every
later call to a local directory (`cnnflow.tracking.sync`), uploaded by `sync`.
Only global rank 0 creates a tracker; the trainer gives other ranks `NullTracker`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnflow.errors import CnnflowError
from cnnflow.fileio import raise_storage, storage_reason
from cnnflow.tracking.lineage import detect_runner, lineage_tags
from cnnflow.tracking.mlflow_run import MlflowTracker

log = logging.getLogger("cnnflow")

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
PARENT_ENV = "CNNFLOW_PARENT_RUN_ID"
# What KFP's MLflow plugin sets in every step: the task's nested run and its experiment
TASK_RUN_ENV, TASK_EXPERIMENT_ENV = "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"
PARENT_TAG, PIPELINE_TAG = "mlflow.parentRunId", "cnnflow.pipeline_key"
# Client retries once the run has started: MLflow's default (7 retries, backoff factor 2)
# waits minutes per call before a dead server is noticed; 2 retries cost ~2-4 s.
HTTP_RETRIES, HTTP_BACKOFF = "2", "1"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use; a sqlite database is created (with its directory) if absent."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        ensure_sqlite_store(uri, db)
    return uri


_READY: set[str] = set()


def ensure_sqlite_store(uri: str, db: Path) -> None:
    """Open the sqlite store once per process under an exclusive `<db>.lock`: MLflow
    creates and migrates a new database on first use, and two processes doing that at
    once make one fail ("Online migration expected to match one row")."""
    if uri in _READY:
        return
    import fcntl

    # MLflow logs a full disk under its store as a traceback before raising it; the
    # raised error becomes one line (store_faults), so its traceback is not shown
    logging.getLogger("mlflow.store.db.utils").addFilter(_not_a_storage_fault)

    from mlflow import MlflowClient

    if not os.access(db if db.exists() else db.parent, os.W_OK):
        raise CnnflowError(f"{uri}: the sqlite tracking store {db} is not writable")
    with store_faults(uri), open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _READY.add(uri)


def _not_a_storage_fault(record: logging.LogRecord) -> bool:
    return not (record.exc_info and storage_reason(record.exc_info[1]))


@contextlib.contextmanager
def store_faults(uri: str) -> Iterator[None]:
    """A full disk or an I/O error under the store ("database or disk is full", "disk I/O
    error", ENOSPC) as one line naming it, instead of MLflow's or SQLAlchemy's trace."""
    try:
        yield
    except CnnflowError:
        raise
    except Exception as exc:
        db = _sqlite_path(uri)
        raise_storage(exc, f"writing the tracking store {db if db is not None else uri}")
        raise


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise a one-line CnnflowError when the tracking store cannot be used at all."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            reason = str(getattr(exc, "reason", exc))
        raise CnnflowError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            f"(`cnnflow mlflow-server`), fix MLFLOW_TRACKING_URI, or set tracking.offline=true "
            f"to log to {DEFAULT_TRACKING_URI}"
        )
    db = _sqlite_path(uri)
    if db is not None and not os.access(db.parent if not db.exists() else db, os.W_OK):
        raise CnnflowError(f"{uri}: the sqlite tracking store {db} is not writable")


def _artifact_root(uri: str) -> str | None:
    """For a sqlite store: `<db dir>/artifacts` (a server decides for itself: None)."""
    db = _sqlite_path(uri)
    return (db.parent.resolve() / "artifacts").as_uri() if db is not None else None


def ensure_experiment(client, name: str) -> str:
    """The id of experiment `name`, created (with the store's artifact root) if absent."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = _artifact_root(client.tracking_uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextlib.contextmanager
def fluent_target(uri: str, run_id: str | None = None) -> Iterator[None]:
    """Point MLflow's fluent API (which `log_model`/`load_model` use) at `uri` and at the
    experiment of `run_id`, restoring both afterwards: the fluent globals otherwise put a
    logged model in experiment 0 of whatever store was last set."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    # Not mlflow's own _use_tracking_uri: restoring "no URI" there also deletes
    # $MLFLOW_TRACKING_URI from the environment.
    old_uri, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    old_experiment = fluent._active_experiment_id
    mlflow.set_tracking_uri(uri)
    try:
        if run_id:
            fluent._active_experiment_id = (
                mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id)
        yield
    finally:
        fluent._active_experiment_id = old_experiment
        mlflow.set_tracking_uri(old_uri)
        if old_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


# ---------------------------------------------------------------------------- runs


def _prepare(tracking_uri: str | None, offline: bool, timeout_s: float) -> str:
    uri = resolve_tracking_uri(tracking_uri)
    if offline and not uri.startswith("sqlite:"):
        uri = resolve_tracking_uri(DEFAULT_TRACKING_URI)
        log.warning("tracking offline: logging to %s (%s); the server is not contacted",
                    uri, _sqlite_path(uri).resolve())
    check_reachable(uri, timeout_s)
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", HTTP_BACKOFF)
    return uri


def parent_name(runner: str, key: str | None = None) -> str:
    """`<runner>-<YYYYmmdd-HHMM>-<8 chars>`: readable and unique in the MLflow run list;
    the 8 characters end the pipeline key (a KFP run id) or are random without one."""
    short = (key or "").rsplit("-", 1)[-1][-8:] or uuid.uuid4().hex[:8]
    return f"{runner}-{time.strftime('%Y%m%d-%H%M')}-{short}"


def dvc_run_key() -> str | None:
    """`dvc-<pid>-<start time>` of the `dvc repro` / `dvc exp run` process this stage runs
    under (the nearest ancestor process that is `dvc`), or None outside DVC: every stage
    of one invocation, and every rank of its torchrun, finds the same parent run by it."""
    if not os.environ.get("DVC_STAGE"):
        return None
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            argv = proc.cmdline()
            names = [Path(a).name for a in argv[:2]]
            if "dvc" in names:
                return f"dvc-{proc.pid}-{int(proc.create_time())}"
            proc = proc.parent()
    except psutil.Error:
        return None
    return None


def runner_key(runner: str) -> str | None:
    """The key of the pipeline run this process belongs to: the KFP run id under KFP, the
    DVC invocation under DVC; None for a single CLI command, which has no parent."""
    if runner in ("kfp", "kfp-local"):
        return os.environ.get("KFP_RUN_ID") or None
    if runner == "dvc":
        return dvc_run_key()
    return None


def start_parent_run(*, experiment: str = "cnnflow", run_name: str | None = None,
                     runner: str | None = None, pipeline_key: str | None = None,
                     tracking_uri: str | None = None, offline: bool = False,
                     timeout_s: float = 5.0) -> str:
    """The pipeline's parent run id: `$CNNFLOW_PARENT_RUN_ID`, else the run tagged with
    `pipeline_key` (default: `runner_key`, so every KFP component, or every stage of one
    `dvc repro`, finds the same parent), else a new run. A found parent is RUNNING again
    while a stage runs. The id is exported to `$CNNFLOW_PARENT_RUN_ID` for child processes.
    """
    uri = _prepare(tracking_uri, offline, timeout_s)
    with store_faults(uri):
        return _start_parent_run(uri, experiment, run_name, runner, pipeline_key)


def _start_parent_run(uri: str, experiment: str, run_name: str | None, runner: str | None,
                      pipeline_key: str | None) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    given = os.environ.get(PARENT_ENV)
    if given:
        try:
            return client.get_run(given).info.run_id
        except MlflowException:
            raise CnnflowError(f"{PARENT_ENV}={given}: no such run at {uri}") from None
    experiment_id = ensure_experiment(client, experiment)
    runner = runner or detect_runner()
    key = pipeline_key or runner_key(runner)
    run_id = None
    if key:
        found = client.search_runs([experiment_id], f"tags.`{PIPELINE_TAG}` = '{key}'",
                                   max_results=1)
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
    if run_id is None:
        tags = {"cnnflow.runner": runner, "cnnflow.role": "pipeline"}
        if key:
            tags[PIPELINE_TAG] = key
        run = client.create_run(experiment_id, run_name=run_name or parent_name(runner, key),
                                tags=tags)
        run_id = run.info.run_id
    os.environ[PARENT_ENV] = run_id
    return run_id


@dataclass(frozen=True)
class TaskRun:
    """The run KFP's MLflow plugin opened for this task, and the pipeline's run above it."""

    run_id: str
    experiment_id: str
    pipeline_run_id: str


def kfp_task_run(uri: str | None = None) -> TaskRun | None:
    """`$MLFLOW_RUN_ID` as a `TaskRun`, or None when it is not set; a one-line
    CnnflowError when the store at `uri` has no such run, or it is not in
    `$MLFLOW_EXPERIMENT_ID`."""
    run_id = os.environ.get(TASK_RUN_ENV, "").strip()
    if not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(uri)
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as exc:
        reason = (exc.message or str(exc)).strip().splitlines()[0][:200]
        raise CnnflowError(f"{TASK_RUN_ENV}={run_id}: no such run at {uri} ({reason})"
                           ) from None
    experiment = os.environ.get(TASK_EXPERIMENT_ENV, "").strip()
    if experiment and experiment != run.info.experiment_id:
        raise CnnflowError(f"{TASK_RUN_ENV}={run_id} is in experiment "
                           f"{run.info.experiment_id} at {uri}, not "
                           f"{TASK_EXPERIMENT_ENV}={experiment}")
    pipeline = run.data.tags.get(PARENT_TAG) or run_id
    return TaskRun(run_id, run.info.experiment_id, pipeline)


def end_parent_run(run_id: str, status: str = "FINISHED", tracking_uri: str | None = None,
                   tags: dict[str, str] | None = None) -> None:
    """Set `tags` on the parent run and close it with `status`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


def stage_run(stage: str, *, params: dict[str, Any] | None = None,
              parent_run_id: str | None = None, experiment: str = "cnnflow",
              tracking_uri: str | None = None, runner: str | None = None,
              dataset_version: str | None = None, world_size: int | None = None,
              degrees: dict[str, int] | None = None, spool_dir: str | Path | None = None,
              log_system_metrics: bool = False, offline: bool = False,
              timeout_s: float = 5.0) -> MlflowTracker:
    """Open a child run for `stage` under the pipeline's parent run and log its config
    (flattened params) and lineage tags. Fails with one line, before any work, when the
    tracking server is unreachable (unless `offline`) or its store's disk is full.

    The parent: `parent_run_id`, else KFP's task run (`$MLFLOW_RUN_ID`, see the module
    docstring), else `start_parent_run`'s under a pipeline runner, else none."""
    uri = _prepare(tracking_uri, offline, timeout_s)
    with store_faults(uri):
        return _stage_run(stage, uri=uri, params=params, parent_run_id=parent_run_id,
                          experiment=experiment, runner=runner,
                          dataset_version=dataset_version, world_size=world_size,
                          degrees=degrees, spool_dir=spool_dir,
                          log_system_metrics=log_system_metrics, timeout_s=timeout_s)


def _stage_run(stage: str, *, uri: str, params: dict[str, Any] | None,
               parent_run_id: str | None, experiment: str, runner: str | None,
               dataset_version: str | None, world_size: int | None,
               degrees: dict[str, int] | None, spool_dir: str | Path | None,
               log_system_metrics: bool, timeout_s: float) -> MlflowTracker:
    from mlflow import MlflowClient

    runner = runner or detect_runner()
    client = MlflowClient(tracking_uri=uri)
    parent, summary, experiment_id = parent_run_id, parent_run_id, None
    task = kfp_task_run(uri) if parent is None else None
    if task is not None:
        parent, summary, experiment_id = task.run_id, task.pipeline_run_id, task.experiment_id
    elif parent is None and (os.environ.get(PARENT_ENV) or runner_key(runner)):
        parent = summary = start_parent_run(experiment=experiment, runner=runner,
                                            tracking_uri=uri, timeout_s=timeout_s)
    tags = lineage_tags(stage, runner=runner, dataset_version=dataset_version,
                        world_size=world_size, degrees=degrees)
    if parent:
        tags[PARENT_TAG] = parent
        experiment_id = experiment_id or client.get_run(parent).info.experiment_id
    else:  # a single CLI command: its own top-level run
        experiment_id = ensure_experiment(client, experiment)
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    meta = {"experiment_name": experiment, "run_name": stage, "tags": tags,
            "parent_run_id": parent}
    # Under DVC no step closes the pipeline: each stage closes the parent with its own
    # status (the next stage of the same invocation reopens it), so none stays RUNNING.
    tracker = MlflowTracker(run.info.run_id, tracking_uri=uri, spool_dir=spool_dir,
                            log_system_metrics=log_system_metrics, meta=meta,
                            parent_run_id=parent, summary_run_id=summary,
                            close_parent=runner == "dvc" and task is None)
    if params:
        tracker.log_params(params)
    return tracker
