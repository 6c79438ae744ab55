"""`cnnflow pipeline compile | run | submit`: the KFP pipeline from the command line.

    compile_pipeline("pipelines/compiled/cnn_training.yaml", image="cnnflow:0.1.0")
    run_local(load_params("params.yaml", ["train.epochs=2"]), workspace=".")   # make run
    submit(params, host="http://localhost:8080", experiment="cnnflow")

`run_local` runs the pipeline with kfp.local's SubprocessRunner in this Python environment
(`use_venv=False`: cnnflow and torch are here; `install_kfp_package=False` on every
component, so no task runs pip). Each step is a fresh process, as each is a pod on a
cluster. The workspace (default: the current directory) plays the PVC: the stages read and
write data/, runs/<job>/, reports/ and mlflow/ there, exactly where `dvc repro` and the CLI
do; KFP's own task outputs and its log go to <workspace>/outputs/kfp. The train step runs
the PyTorchJob with launch.backend (local: processes here).

`submit` validates the parameters, checks that the host answers (a few seconds at most),
compiles, and starts a run with kfp.Client; it returns the run's URL.

One image: `image` (compile and submit; default the local tag cnnflow:0.1.0) is every
step's container image and launch.image, the training job's: `submit` also passes it as
the run's launch_image argument. An image without a tag or digest is refused in one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path
from typing import Any, TextIO

from cnnflow.config import Params
from cnnflow.errors import CnnflowError
from cnnflow.kfp.params import WORKSPACE, to_arguments
from cnnflow.kfp.steps import ERROR_PREFIX
from cnnflow.tracking.lineage import GIT_COMMIT_ENV, GIT_DIRTY_ENV, git_info

log = logging.getLogger("cnnflow")

COMPILED = Path("pipelines/compiled/cnn_training.yaml")
PIPELINE_ROOT = "outputs/kfp"
CONNECT_TIMEOUT_S = 5.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEPS = ("prepare", "shard", "train", "evaluate", "finish")
GIT_ENV = (GIT_COMMIT_ENV, GIT_DIRTY_ENV)
_STARTED = re.compile(r"Executing task '([\w-]+)'")
_FINISHED = re.compile(r"Task '([\w-]+)' finished with status (\w+)")


def compile_pipeline(path: str | Path = COMPILED, *, image: str = "") -> Path:
    """Write the pipeline's YAML (the committed copy is pipelines/compiled/cnn_training.yaml,
    with the default image); `image`: the steps' and the job's image (default the local
    tag, `components.BASE_IMAGE`)."""
    from kfp import compiler

    from cnnflow.kfp.cnn_training import build_pipeline, cnn_training
    from cnnflow.kfp.components import BASE_IMAGE

    pipeline = cnn_training if image in ("", BASE_IMAGE) else build_pipeline(image=image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(path))
    return path


def _task_output(root: Path, task: str) -> dict[str, Any]:
    """The newest executor_output.json of `task` under a kfp.local pipeline root."""
    from cnnflow.kfp.cnn_training import NAME

    files = sorted(root.glob(f"{NAME}-*/{task}/executor_output.json"),
                   key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else {}


def _metadata(output: dict[str, Any], name: str) -> dict[str, Any]:
    for artifact in output.get("artifacts", {}).get(name, {}).get("artifacts") or []:
        return artifact.get("metadata") or {}
    return {}


def _short(version: Any) -> str:
    return str(version or "?")[:12]


def step_result(root: Path, task: str) -> str:
    """The key result of a finished task, from its executor output (what the step's
    artifacts say about it)."""
    out = _task_output(root, task)
    if task == "prepare":
        m = _metadata(out, "dataset")
        return (f"{m.get('source')} {_short(m.get('dataset_version'))}: train "
                f"{m.get('train_count')}, val {m.get('val_count')}, test {m.get('test_count')}")
    if task == "shard":
        m = _metadata(out, "shards")
        return f"{m.get('shards')} shards of {_short(m.get('dataset_version'))}"
    if task == "train":
        m = _metadata(out, "model")
        rate, acc = m.get("samples_per_s"), m.get("val_accuracy")
        return (f"{m.get('steps')} steps, {rate or 0:.0f} samples/s, val accuracy "
                f"{acc or 0:.4f} (job {m.get('job')}, {m.get('job_s', 0):.1f} s)")
    if task == "evaluate":
        test = _metadata(out, "metrics").get("accuracy")
        report = _metadata(out, "report")
        version = report.get("model_version")
        registered = f"; {report.get('model_name')} v{version}" if version else ""
        return (f"test accuracy {test or 0:.4f}{registered}; champion decision: "
                f"{report.get('decision')}")
    if task == "finish":
        return f"MLflow parent run {out.get('parameterValues', {}).get('Output', '?')}"
    return ""


class Console(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr while kfp.local runs: every byte goes to the
    run's log file (and, `verbose`, to the terminal); the terminal gets one line per step
    as it starts and as it ends, with its status, seconds and key result.

    kfp.local's driver prints its own log and each task process's streamed output through
    sys.stdout, so this sees both: "Executing task 'x'", "Task 'x' finished with status
    SUCCESS/FAILURE", and a failing step's `cnnflow: error: ...` line.
    """

    def __init__(self, log_file: TextIO, terminal: TextIO, root: Path, *,
                 verbose: bool = False) -> None:
        self.log, self.terminal, self.root, self.verbose = log_file, terminal, root, verbose
        self.error = ""  # the last failing step's own one-line error
        self.finished: dict[str, str] = {}
        self._pending = ""
        self._started: dict[str, float] = {}

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.verbose:
            self.terminal.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            plain = _ANSI.sub("", line)  # kfp.local colours task names and statuses
            self.log.write(plain + "\n")
            self._line(plain)
        return len(text)

    def close_log(self) -> None:
        """Write what is left of an unfinished last line."""
        if self._pending:
            self.log.write(_ANSI.sub("", self._pending))
            self._pending = ""
        self.log.flush()

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def show(self, line: str) -> None:
        self.terminal.write(line + "\n")
        self.terminal.flush()

    def _label(self, task: str) -> str:
        number = STEPS.index(task) + 1 if task in STEPS else 0
        return f"[{number}/{len(STEPS)}] {task:<8}"

    def _line(self, line: str) -> None:
        if (m := _STARTED.search(line)) and m.group(1) in STEPS:
            self._started[m.group(1)] = time.monotonic()
            self.show(f"{self._label(m.group(1))} started")
        elif (m := _FINISHED.search(line)) and m.group(1) in STEPS:
            task, status = m.group(1), m.group(2)
            seconds = time.monotonic() - self._started.get(task, time.monotonic())
            self.finished[task] = status
            if status == "SUCCESS":
                detail = step_result(self.root, task)
                self.show(f"{self._label(task)} ok      {seconds:5.1f} s  {detail}")
            else:
                self.show(f"{self._label(task)} FAILED  {seconds:5.1f} s  "
                          f"{self.error or 'see the log'}")
        elif ERROR_PREFIX in line:
            self.error = line.split(ERROR_PREFIX, 1)[1].strip()


def run_local(params: Params, *, workspace: str | Path = ".",
              pipeline_root: str | Path | None = None, cache: bool = False,
              verbose: bool = False, terminal: TextIO | None = None) -> dict[str, Any]:
    """Run the pipeline on `params` with kfp.local; raise CnnflowError if a task fails.

    kfp.local's own log (its task headers and every step's output) goes to
    <pipeline root>/<run key>.log; `terminal` (default sys.stdout) gets one line per
    step as it starts and ends, and with `verbose` the whole log as well.

    Returns {"wall_s", "job_s", "decision", "model", "report", "pipeline_root", "run_key",
    "log"}: job_s is the training job's own wall time (the train step's launch_training);
    model and report are the train and evaluate steps' artifact metadata; run_key the
    KFP_RUN_ID the steps ran with (the MLflow parent run's `cnnflow.pipeline_key`).
    """
    from kfp import local

    from cnnflow.kfp.cnn_training import build_pipeline

    start = time.monotonic()
    ws = Path(workspace).resolve()
    root = Path(pipeline_root).resolve() if pipeline_root else ws / PIPELINE_ROOT
    root.mkdir(parents=True, exist_ok=True)
    arguments = {**to_arguments(params), WORKSPACE: str(ws)}
    # kfp.local leaves placeholders in environment values unresolved: every step finds the
    # run's MLflow parent by this key instead (the uncached steps also get kfp.local's id)
    key = f"kfp-local-{uuid.uuid4().hex[:12]}"
    log_path = root / f"{key}.log"
    previous = {name: os.environ.get(name) for name in ("KFP_RUN_ID", *GIT_ENV)}
    os.environ["KFP_RUN_ID"] = key
    # the checkout this runs from: the steps and the training job run in the workspace
    # and in job directories, where git may see another repository or none
    git = git_info()
    if git:
        os.environ[GIT_ENV[0]] = git["cnnflow.git_commit"]
        os.environ[GIT_ENV[1]] = git["cnnflow.git_dirty"]
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True, enable_caching=cache)
    pipeline = build_pipeline(local=True)
    with open(log_path, "w", encoding="utf-8") as log_file, warnings.catch_warnings():
        console = Console(log_file, terminal or sys.stdout, root, verbose=verbose)
        # SubprocessRunner warns about every non-"python" base image: ours is cnnflow:<tag>
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
                pipeline(**arguments)
        except RuntimeError as exc:
            first = _ANSI.sub("", str(exc)).strip().splitlines()[0]
            where = f"(log: {_relative(log_path)})"
            raise CnnflowError(f"kfp.local: {console.error} {where}" if console.error else
                               f"kfp.local: {first} {where}") from None
        finally:
            console.close_log()
            for name, value in previous.items():
                _restore(name, value)
    model = _metadata(_task_output(root, "train"), "model")
    evaluate = _task_output(root, "evaluate")
    return {"wall_s": time.monotonic() - start, "job_s": float(model.get("job_s") or 0.0),
            "decision": evaluate.get("parameterValues", {}).get("Output", ""),
            "model": model, "report": _metadata(evaluate, "report"),
            "pipeline_root": str(root), "run_key": key, "log": str(log_path)}


def summary_lines(result: dict[str, Any], params: Params) -> list[str]:
    """What `cnnflow pipeline run` prints once every step has ended well."""
    model, report = result["model"], result["report"]
    version = report.get("model_version")
    registered = (f"registered {report.get('model_name')} v{version} @challenger"
                  if version else "not registered")
    lines = [
        f"pipeline succeeded in {result['wall_s']:.1f} s "
        f"(training job {result['job_s']:.1f} s)",
        f"  model    {_relative(Path(model.get('path', '?')) / 'model.pt')}; {registered}; "
        f"champion decision: {report.get('decision') or result['decision']} "
        f"({report.get('reason', '')})",
        f"  reports  {_relative(Path(report.get('reports', params.evaluate.out_dir)))}/ "
        f"(metrics.json, per_class.json, plots/)",
    ]
    if report.get("mlflow_parent_run_id"):
        lines.append(f"  MLflow   experiment {report.get('experiment')}, run "
                     f"{report['mlflow_parent_run_id']} in {report.get('tracking_uri')}; "
                     f"browse it with `make mlflow-ui`")
    lines.append(f"  KFP log  {_relative(Path(result['log']))}")
    return lines


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


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
           workspace: str = "/workspace", image: str = "",
           timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Start a run of the pipeline at the KFP endpoint `host`; return the run's URL.
    `image` (default launch.image): the steps' image and the run's launch.image."""
    import dataclasses

    from cnnflow.configs.launch import check_image

    image = check_image(image, "--image") if image else params.launch.image
    params = dataclasses.replace(params, launch=dataclasses.replace(params.launch,
                                                                    image=image))
    _check_host(host, timeout_s)
    import kfp

    arguments = {**to_arguments(params), WORKSPACE: workspace}
    run_name = run_name or f"cnn-training-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "cnn_training.yaml", image=image)
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
