"""`cnnflow pipeline compile | run | submit`: the KFP pipeline from the command line.

    compile_pipeline("pipelines/compiled/cnn_training.yaml")
    run_local(load_params("params.yaml", ["train.epochs=2"]), workspace=".")   # make run
    submit(params, host="http://localhost:8080", experiment="cnnflow")

`run_local` runs the pipeline with kfp.local's SubprocessRunner in this Python environment
(`use_venv=False`: cnnflow and torch are here; `install_kfp_package=False` on every
component, so no task runs pip). The workspace (default: the current directory) plays the
PVC: the stages read and write data/, runs/<job>/, reports/ and mlflow/ there, exactly
where `dvc repro` and the CLI do; KFP's own task outputs go to <workspace>/outputs/kfp.
The train step runs the PyTorchJob with launch.backend (local: processes here).

`submit` validates the parameters, checks that the host answers (a few seconds at most),
compiles, and starts a run with kfp.Client; it returns the run's URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path
from typing import Any

from cnnflow.config import Params
from cnnflow.errors import CnnflowError
from cnnflow.kfp.params import WORKSPACE, to_arguments

log = logging.getLogger("cnnflow")

COMPILED = Path("pipelines/compiled/cnn_training.yaml")
PIPELINE_ROOT = "outputs/kfp"
CONNECT_TIMEOUT_S = 5.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def compile_pipeline(path: str | Path = COMPILED) -> Path:
    """Write the pipeline's YAML (the committed copy is pipelines/compiled/cnn_training.yaml)."""
    from kfp import compiler

    from cnnflow.kfp.cnn_training import cnn_training

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(cnn_training, str(path))
    return path


def _task_output(root: Path, task: str) -> dict[str, Any]:
    """The newest executor_output.json of `task` under a kfp.local pipeline root."""
    import json

    from cnnflow.kfp.cnn_training import NAME

    files = sorted(root.glob(f"{NAME}-*/{task}/executor_output.json"),
                   key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else {}


def _metadata(output: dict[str, Any], name: str) -> dict[str, Any]:
    for artifact in output.get("artifacts", {}).get(name, {}).get("artifacts") or []:
        return artifact.get("metadata") or {}
    return {}


def run_local(params: Params, *, workspace: str | Path = ".",
              pipeline_root: str | Path | None = None, cache: bool = False,
              step_host: bool = True) -> dict[str, Any]:
    """Run the pipeline on `params` with kfp.local; raise CnnflowError if a task fails.

    step_host: run the steps in children of a warm host process (`cnnflow.kfp.host`), which
    imports mlflow, torch and the rest once for the whole run instead of once per task;
    False runs each step in its own task process, as a cluster does.

    Returns {"wall_s", "job_s", "orchestration_s", "decision", "model", "pipeline_root",
    "run_key"}:
    job_s is the training job's own wall time (the train step's launch_training),
    orchestration_s the rest; model is the train step's Model artifact metadata; run_key
    the KFP_RUN_ID the steps ran with (the MLflow parent run's `cnnflow.pipeline_key`).
    """
    from cnnflow.kfp.host import start_host
    from cnnflow.kfp.steps import ERROR_ENV

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cnnflow-") as tmp, \
            (start_host(tmp) if step_host else contextlib.nullcontext()):
        errors = Path(tmp) / "step-errors.txt"
        previous = os.environ.get(ERROR_ENV)
        os.environ[ERROR_ENV] = str(errors)
        try:
            result = _run_local(params, workspace, pipeline_root, cache)
        except CnnflowError:
            lines = errors.read_text(encoding="utf-8").splitlines() if errors.is_file() else []
            if lines:  # the step's own one-line error: it names the value
                raise CnnflowError(f"kfp.local: {lines[-1]}") from None
            raise
        finally:
            _restore(ERROR_ENV, previous)
    wall = time.monotonic() - start
    return {**result, "wall_s": wall, "orchestration_s": wall - result["job_s"]}


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _run_local(params: Params, workspace: str | Path, pipeline_root: str | Path | None,
               cache: bool) -> dict[str, Any]:
    from kfp import local

    from cnnflow.kfp.cnn_training import build_pipeline

    ws = Path(workspace).resolve()
    root = Path(pipeline_root).resolve() if pipeline_root else ws / PIPELINE_ROOT
    arguments = {**to_arguments(params), WORKSPACE: str(ws)}
    # kfp.local leaves placeholders in environment values unresolved: every step finds the
    # run's MLflow parent by this key instead (the uncached steps also get kfp.local's id)
    key = f"kfp-local-{uuid.uuid4().hex[:12]}"
    previous = os.environ.get("KFP_RUN_ID")
    os.environ["KFP_RUN_ID"] = key
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True, enable_caching=cache)
    pipeline = build_pipeline(local=True)
    with warnings.catch_warnings():
        # SubprocessRunner warns about every non-"python" base image: ours is cnnflow:<tag>
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # resources and kfp-kubernetes settings are for the cluster (DESIGN.md's kfp.local traps)
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        try:
            pipeline(**arguments)
        except RuntimeError as exc:
            first = _ANSI.sub("", str(exc)).strip().splitlines()[0]
            raise CnnflowError(f"kfp.local: {first} (its log is above)") from None
        finally:
            _restore("KFP_RUN_ID", previous)
    model = _metadata(_task_output(root, "train"), "model")
    decision = _task_output(root, "evaluate").get("parameterValues", {}).get("Output", "")
    return {"job_s": float(model.get("job_s") or 0.0), "decision": decision, "model": model,
            "pipeline_root": str(root), "run_key": key}


def _check_host(host: str, timeout_s: float) -> None:
    """One line within ~`timeout_s` when `host` does not answer HTTP (kfp.Client would retry
    or wait without limit). Any HTTP status counts as an answer (an auth proxy's 401/302)."""
    url = urllib.parse.urlsplit(host)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise CnnflowError(f"KFP host {host!r}: expected an http(s):// URL")
    try:
        with urllib.request.urlopen(f"{host.rstrip('/')}/apis/v2beta1/healthz",
                                    timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CnnflowError(f"KFP host {host} does not answer ({reason})") from None


def submit(params: Params, *, host: str, experiment: str = "cnnflow", run_name: str = "",
           namespace: str | None = None, service_account: str | None = None,
           workspace: str = "/workspace", timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Start a run of the pipeline at the KFP endpoint `host`; return the run's URL."""
    _check_host(host, timeout_s)
    import kfp

    arguments = {**to_arguments(params), WORKSPACE: workspace}
    run_name = run_name or f"cnn-training-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "cnn_training.yaml")
        try:
            client = kfp.Client(host=host, namespace=namespace)
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name,
                experiment_name=experiment, namespace=namespace,
                service_account=service_account)
        except Exception as exc:  # noqa: BLE001 - any client/HTTP error: one line, the host
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else \
                type(exc).__name__
            raise CnnflowError(f"KFP host {host}: {reason}") from None
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
