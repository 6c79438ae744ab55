"""What the KFP components do, as plain functions (each component calls exactly one).

Every step first `enter`s: it decodes the parameters, changes into the workspace (the PVC
mounted at /workspace in the cluster; a local directory under kfp.local), so that
params.yaml's relative paths (data/prepared, data/shards, reports, mlflow/mlflow.db)
mean what they mean for the CLI and `dvc repro`; exports KFP_RUN_ID and CNNFLOW_RUNNER;
and finds the pipeline's MLflow parent run by the KFP run id (creating it in the first
step). The stage function then opens its child run under that parent.

Under KFP's MLflow plugin (the backend sets `$MLFLOW_RUN_ID`, the task's nested run, see
`cnnflow.tracking.mlflow_tracker`) no step opens or closes a parent: `enter` checks that
the task run exists (one line naming the id and the tracking URI if not), each stage's
run is a child of its task's run, the train step hands its task run to the training job
(the pods' `CNNFLOW_PARENT_RUN_ID`, with `MLFLOW_WORKSPACE` and `MLFLOW_TRACKING_AUTH`),
and `finish` leaves the parent to the backend, which closes it with the pipeline.

Each step runs in a fresh process (a pod, or a kfp.local task process) and imports only
what it uses: prepare, shard and finish never import torch; mlflow is imported once, by
`enter`, and only when tracking is on. Its first own line, `step NAME: started ...`,
gives the process's cold start: the seconds from process start to the step's work
(`bench/steps.py` compares it with the bare import time of the step's libraries).

Data never travels through the component's own filesystem: the output artifacts hold the
paths on shared storage and metadata (dataset version, counts, model URI) plus small
files (dataset.json, manifest.json, the model's model.json/mlflow.json, the report).
Artifacts are duck-typed (`.path`, `.metadata`), so tests can pass simple objects.
A user mistake (a CnnflowError) is printed as one line, `cnnflow: error: step NAME
failed: ...`, before it fails the task: `cnnflow pipeline run` shows that line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from cnnflow.config import Params
from cnnflow.errors import CnnflowError
from cnnflow.kfp.params import decode
from cnnflow.tracking.mlflow_tracker import DEFAULT_TRACKING_URI, PARENT_ENV, TASK_RUN_ENV

ERROR_PREFIX = "cnnflow: error: "


def _step(fn):
    """A step function: a CnnflowError is also printed as the step's one-line error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CnnflowError as exc:
            name = fn.__name__.removesuffix("_step")
            print(f"{ERROR_PREFIX}step {name} failed: {exc}", file=sys.stderr, flush=True)
            raise

    return wrapper


def cold_start_s() -> float:
    """Seconds since this process started (the OS's start time, so imports count)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


# The heavy libraries a step may have loaded by its first line (what `bench/steps.py`
# times as the step's bare imports)
LIBRARIES = ("kfp", "mlflow", "numpy", "torch", "webdataset", "sklearn", "matplotlib",
             "kubernetes", "kubeflow")


def _started(step: str) -> None:
    loaded = ",".join(m for m in LIBRARIES if m in sys.modules)
    print(f"step {step}: started, cold start {cold_start_s():.2f} s, loaded {loaded}",
          flush=True)


def _resolved(value: str) -> str:
    """'' for a placeholder the runner left unresolved (kfp.local leaves env values as is)."""
    return "" if value.startswith("{{") else value


def _absolute_uri(uri: str, workspace: Path) -> str:
    """A relative sqlite URI made absolute against the workspace (the training job and
    every component must reach the same database from other working directories)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(workspace / uri[len(prefix):])
    return uri


def enter(params_text: str, *, workspace: str, kfp_run_id: str = "",
          runner: str | None = None) -> Params:
    """Decode, chdir into the workspace, export the run's identity, open/find the parent run
    (under KFP's MLflow plugin: check the task's run, which is the stages' parent).

    Tracking store: tracking.uri, else $MLFLOW_TRACKING_URI, else (in the cluster)
    launch.tracking_uri, else sqlite:///mlflow/mlflow.db in the workspace.
    """
    params = decode(params_text)
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    os.chdir(ws)
    key = _resolved(os.environ.get("KFP_RUN_ID", "")) or _resolved(kfp_run_id)
    if key:
        os.environ["KFP_RUN_ID"] = key
    else:  # an unresolved placeholder is no run id (and no lineage tag)
        os.environ.pop("KFP_RUN_ID", None)
    runner = runner or os.environ.get("CNNFLOW_RUNNER") or "kfp"
    os.environ["CNNFLOW_RUNNER"] = runner
    # An inherited parent (e.g. from the shell that started kfp.local) is not this run's.
    os.environ.pop(PARENT_ENV, None)
    tc = params.tracking
    if not tc.enabled:
        return params
    from cnnflow.tracking.mlflow_tracker import check_reachable, kfp_task_run, start_parent_run

    cluster_uri = params.launch.tracking_uri if runner == "kfp" else ""
    uri = _absolute_uri(tc.uri or os.environ.get("MLFLOW_TRACKING_URI") or cluster_uri
                        or DEFAULT_TRACKING_URI, ws)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    params = dataclasses.replace(params, tracking=dataclasses.replace(tc, uri=uri))
    if os.environ.get(TASK_RUN_ENV, "").strip():  # KFP's MLflow plugin owns the parent
        if not tc.offline:  # one line within seconds, not the client's minutes of retries
            check_reachable(uri, tc.check_timeout_s)
            kfp_task_run(uri)
        return params
    start_parent_run(experiment=tc.experiment, runner=runner, pipeline_key=key or None,
                     tracking_uri=uri,
                     offline=tc.offline, timeout_s=tc.check_timeout_s)
    return params


def _artifact_dir(artifact: Any) -> Path:
    path = Path(artifact.path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _copy(src: Path, artifact: Any) -> None:
    if src.is_file():
        shutil.copy2(src, _artifact_dir(artifact) / src.name)


def _replace(params: Params, section: str, **changes: Any) -> Params:
    return dataclasses.replace(params, **{section: dataclasses.replace(
        getattr(params, section), **changes)})


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@_step
def prepare_step(params_text: str, *, workspace: str, kfp_run_id: str = "",
                 dataset: Any) -> dict[str, Any]:
    """`run_prepare` into <workspace>/<prepare.out_dir>; `dataset` = its path + dataset.json."""
    params = enter(params_text, workspace=workspace, kfp_run_id=kfp_run_id)
    from cnnflow.stages import run_prepare

    _started("prepare")
    meta = run_prepare(params)
    out = Path(params.prepare.out_dir).resolve()
    _copy(out / "dataset.json", dataset)
    dataset.metadata.update({
        "path": str(out), "dataset_version": meta["version"], "source": meta["source"],
        **{f"{s}_count": meta["splits"][s]["count"] for s in ("train", "val", "test")}})
    print(f"prepared {meta['source']} -> {out} (version {meta['version'][:12]})")
    return meta


@_step
def shard_step(params_text: str, *, workspace: str, kfp_run_id: str = "",
               prepared: Any, shards: Any) -> dict[str, Any]:
    """`run_shard` of the prepared data at `prepared`'s path; `shards` = path + manifest."""
    params = enter(params_text, workspace=workspace, kfp_run_id=kfp_run_id)
    from cnnflow.stages import run_shard

    _started("shard")
    params = _replace(params, "prepare", out_dir=prepared.metadata["path"])
    manifest = run_shard(params)
    out = Path(params.shard.out_dir).resolve()
    _copy(out / "manifest.json", shards)
    shards.metadata.update({
        "path": str(out), "dataset_version": manifest["dataset_version"],
        "shards": sum(len(s["shards"]) for s in manifest["splits"].values()),
        **{f"{s}_count": v["samples"] for s, v in manifest["splits"].items()}})
    print(f"sharded {manifest['dataset_version'][:12]} -> {out}")
    return manifest


@_step
def train_step(params_text: str, *, workspace: str, kfp_run_id: str,
               shards: Any, model: Any) -> dict[str, Any]:
    """Run the train stage as a PyTorchJob (`launch_training`, backend launch.backend) on
    the shards at `shards`' path; `model` = the job's output dir, model URI, small files.

    The job name derives from the KFP run id, so a retried step resumes the same job's
    checkpoints under <mount_path>/runs/<job>/.
    """
    params = enter(params_text, workspace=workspace, kfp_run_id=kfp_run_id)
    from cnnflow.launch import launch_training

    _started("train")
    start = time.monotonic()
    result = launch_training(params, shards=shards.metadata["path"], workspace=Path.cwd(),
                             run_id=_resolved(kfp_run_id), parent_run_id=_parent_run(),
                             echo=lambda line: print(line, flush=True))
    job_s = time.monotonic() - start
    out = Path(result.out_dir)
    record, summary = _read_json(out / "mlflow.json"), _read_json(out / "summary.json")
    for name in ("model.json", "mlflow.json", "summary.json"):
        _copy(out / name, model)
    last = (summary.get("history") or [{}])[-1]
    model.metadata.update({
        "path": str(out), "job": result.name, "backend": result.backend,
        "checkpoint_dir": result.checkpoint_dir, "job_s": round(job_s, 3),
        "model_uri": record.get("model_uri") or "", "train_run_id": record.get("run_id") or "",
        "dataset_version": summary.get("dataset_version", shards.metadata.get("dataset_version")),
        "val_accuracy": last.get("val_accuracy"), "samples_per_s": last.get("samples_per_s"),
        "steps": summary.get("steps"),
    })
    print(f"PyTorchJob {result.name} ({result.backend}) succeeded in {job_s:.1f} s -> {out}")
    return dict(model.metadata)


def _parent_run() -> str:
    """The run the training job's stage run nests under: this task's run under KFP's
    MLflow plugin, else the pipeline's parent run ('' with tracking off)."""
    return (os.environ.get(TASK_RUN_ENV, "").strip()
            or os.environ.get(PARENT_ENV, ""))


def _pipeline_run(params: Params) -> str:
    """The pipeline's MLflow run: the KFP backend's parent run under its MLflow plugin,
    else cnnflow's own parent ('' with tracking off)."""
    if params.tracking.enabled and os.environ.get(TASK_RUN_ENV, "").strip():
        from cnnflow.tracking.mlflow_tracker import kfp_task_run

        task = kfp_task_run(params.tracking.uri)
        return task.pipeline_run_id if task else ""
    return os.environ.get(PARENT_ENV, "")


def _report(result: dict[str, Any], model: Any, shards: Any) -> str:
    m = result["metrics"]
    rows = [f"| {k} | {v:.4f} |" for k, v in m.items()
            if isinstance(v, float) and not isinstance(v, bool)]
    lines = ["# cnnflow evaluation", "",
             f"Model `{model.metadata.get('path')}` (job `{model.metadata.get('job')}`), "
             f"dataset `{str(shards.metadata.get('dataset_version'))[:12]}`, "
             f"{m.get('n')} test images.", "", "| metric | value |", "|---|---|", *rows, ""]
    reg, promo = result.get("registered"), result.get("promotion")
    if reg:
        lines.append(f"Registered **{reg['name']}** version **{reg['version']}** "
                     f"as @{reg['alias']}.")
    else:
        lines.append("Not registered (evaluate.register is off, tracking is off, or no "
                     "logged model).")
    if promo:
        champion = ("no champion before" if promo["champion_version"] is None else
                    f"champion v{promo['champion_version']} accuracy "
                    f"{promo['champion_accuracy']:.4f}")
        lines += ["", f"Champion decision: **{promo['decision']}** ({promo['reason']}).",
                  f"Challenger accuracy {promo['challenger_accuracy']:.4f}; {champion}."]
    return "\n".join(lines) + "\n"


@_step
def evaluate_step(params_text: str, *, workspace: str, kfp_run_id: str,
                  shards: Any, model: Any, metrics: Any, report: Any) -> str:
    """`run_evaluate` of `model` on `shards`: score, register @challenger, promotion gate.
    Returns (and prints) the champion decision; `metrics` gets the scalar test metrics,
    `report` the Markdown report for the KFP UI and, as metadata, the decision and the
    registered version."""
    params = enter(params_text, workspace=workspace, kfp_run_id=kfp_run_id)
    from cnnflow.stages import run_evaluate

    _started("evaluate")
    path = model.metadata["path"]
    params = _replace(params, "train", shards=shards.metadata["path"], out_dir=path)
    result = run_evaluate(params, path)
    for key, value in result["metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(_report(result, model, shards), encoding="utf-8")
    promo = result.get("promotion")
    decision = promo["decision"] if promo else "none"
    reason = promo["reason"] if promo else "no promotion gate ran"
    reg = result.get("registered") or {}
    report.metadata.update({"decision": decision, "reason": reason,
                            "model_name": reg.get("name", ""),
                            "model_version": str(reg.get("version", "")),
                            "reports": str(Path(params.evaluate.out_dir).resolve()),
                            "mlflow_parent_run_id": _pipeline_run(params),
                            "tracking_uri": params.tracking.uri,
                            "experiment": params.tracking.experiment})
    print(f"champion decision: {decision} ({reason})", flush=True)
    return decision


@_step
def finish_step(params_text: str, *, workspace: str, kfp_run_id: str,
                state: str, error: str = "") -> str:
    """Close the pipeline's parent run: FINISHED when the pipeline succeeded, else FAILED
    (the exit handler runs after success and failure alike). Under KFP's MLflow plugin
    the parent is the backend's: it is left alone (the backend closes it)."""
    params = enter(params_text, workspace=workspace, kfp_run_id=kfp_run_id)
    _started("finish")
    status = "FINISHED" if state.upper() == "SUCCEEDED" else "FAILED"
    if params.tracking.enabled and os.environ.get(TASK_RUN_ENV, "").strip():
        print(f"MLflow parent run {_pipeline_run(params)}: closed by the KFP backend")
    elif params.tracking.enabled:
        from cnnflow.tracking.mlflow_tracker import end_parent_run

        parent = os.environ[PARENT_ENV]
        tags = {"cnnflow.pipeline_state": state}
        if error:
            tags["cnnflow.pipeline_error"] = error[:500]
        end_parent_run(parent, status, tracking_uri=params.tracking.uri, tags=tags)
        print(f"MLflow parent run {parent}: {status}")
    return status
