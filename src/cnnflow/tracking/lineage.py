"""Where a run came from: git commit, DVC lock entry, KFP run, runner, host, versions.

Every value here is a string tag (`cnnflow.*`), so a run in the MLflow UI can be traced
back to the exact code, data and orchestrator run that produced it. Nothing here fails:
a machine without git, a run outside DVC or KFP simply records fewer tags.

Environment variables read (set by the runners, or by hand):

- `CNNFLOW_RUNNER`: `kfp`, `kfp-local`, `dvc` or `cli`; when unset it is guessed from
  `KFP_RUN_ID` (kfp) and `DVC_STAGE` (dvc, set by `dvc repro` for every stage command).
- `KFP_RUN_ID`: the Kubeflow Pipelines run id. KFP does not export it by itself; the
  pipeline passes `dsl.PIPELINE_JOB_ID_PLACEHOLDER` into the component's env under this
  name (kfp.local runs get a local id the same way).
- `DVC_STAGE`: the stage name `dvc repro` runs; its entry in `dvc.lock` is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

RUNNERS = ("kfp", "kfp-local", "dvc", "cli")
DATASET_TAG = "cnnflow.dataset_version"
GIT_TIMEOUT_S = 5.0  # a hung git (network filesystem, lock) must not stall a training start


def _git(args: list[str], cwd: str | Path | None) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


GIT_COMMIT_ENV, GIT_DIRTY_ENV = "CNNFLOW_GIT_COMMIT", "CNNFLOW_GIT_DIRTY"
# Derived files a run rewrites: they do not make the code differ from its commit.
_DERIVED = (":(exclude)reports", ":(exclude)dvc.lock")


def git_info(cwd: str | Path | None = None) -> dict[str, str]:
    """`{"cnnflow.git_commit": sha, "cnnflow.git_dirty": "true"|"false"}`, or {} without git.

    $CNNFLOW_GIT_COMMIT / $CNNFLOW_GIT_DIRTY come first: `cnnflow pipeline run` exports
    the checkout's for its task processes and the training job (which run elsewhere), and
    the image sets them at build time for pods, which have no .git. Dirty means tracked
    files other than the pipeline's outputs (reports/, dvc.lock) differ from the commit
    (untracked files ignored): such a run cannot be reproduced from the commit alone.
    """
    commit = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if commit:
        return {"cnnflow.git_commit": commit,
                "cnnflow.git_dirty": os.environ.get(GIT_DIRTY_ENV, "unknown").strip()}
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return {}
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", ".", *_DERIVED],
                  cwd)
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"cnnflow.git_commit": commit, "cnnflow.git_dirty": dirty}


def source_tags(runner: str, git: dict[str, str]) -> dict[str, str]:
    """MLflow's own source tags, which fill the UI's Source column."""
    tags = {"mlflow.source.name": f"cnnflow ({runner})",
            "mlflow.source.type": "JOB" if runner == "kfp" else "LOCAL"}
    if "cnnflow.git_commit" in git:
        tags["mlflow.source.git.commit"] = git["cnnflow.git_commit"]
    return tags


def dvc_lock_info(stage: str | None = None, lock_path: str | Path = "dvc.lock"
                  ) -> dict[str, str]:
    """Tags for `stage`'s entry in dvc.lock: a sha256 over its deps/outs md5s, and each md5.

    `dvc repro` rewrites the running stage's entry only after the stage succeeds, so for
    the stage itself this is the lock of its previous complete run; upstream stages
    (whose outs are this stage's deps) are already current. {} when there is no lock or
    no such stage.
    """
    stage = stage or os.environ.get("DVC_STAGE")
    path = Path(lock_path)
    if not stage or not path.is_file():
        return {}
    try:
        lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    entry = (lock.get("stages") or {}).get(stage)
    if not isinstance(entry, dict):
        return {}
    files = []
    for kind in ("deps", "outs"):
        for item in entry.get(kind) or []:
            if isinstance(item, dict) and "path" in item:
                files.append((kind, str(item["path"]), str(item.get("md5", ""))))
    digest = hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()
    tags = {"cnnflow.dvc.stage": stage, "cnnflow.dvc.lock_hash": digest}
    for kind, name, md5 in files:
        tags[f"cnnflow.dvc.{kind}.{name}"] = md5
    return tags


def detect_runner() -> str:
    """The runner name for the `cnnflow.runner` tag (see the module docstring)."""
    explicit = os.environ.get("CNNFLOW_RUNNER", "").strip()
    if explicit:
        return explicit
    if os.environ.get("KFP_RUN_ID"):
        return "kfp"
    if os.environ.get("DVC_STAGE"):
        return "dvc"
    return "cli"


def runtime_info() -> dict[str, str]:
    """Host, Python and library versions: what differs between a laptop and a pod.

    torch's version is read from the installed metadata unless torch is already loaded:
    importing it only for the tag costs prepare and shard ~2.5 s each."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    import mlflow

    torch = sys.modules.get("torch")
    try:
        torch_version = torch.__version__ if torch is not None else version("torch")
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        torch_version = "absent"
    return {
        "cnnflow.host": socket.gethostname(),
        "cnnflow.python": platform.python_version(),
        "cnnflow.torch": str(torch_version),
        "cnnflow.mlflow": mlflow.__version__,
    }


def lineage_tags(
    stage: str,
    *,
    runner: str | None = None,
    dataset_version: str | None = None,
    world_size: int | None = None,
    degrees: dict[str, int] | None = None,
    cwd: str | Path | None = None,
    lock_path: str | Path = "dvc.lock",
) -> dict[str, str]:
    """Every lineage tag of a stage run, as strings.

    `degrees` are the parallel degrees actually used, e.g. `{"dp": 4, "pp": 1, "fsdp": 1}`.
    """
    runner = runner or detect_runner()
    tags: dict[str, str] = {"cnnflow.stage": stage, "cnnflow.runner": runner}
    git = git_info(cwd)
    tags.update(git)
    tags.update(source_tags(runner, git))
    image = os.environ.get("CNNFLOW_IMAGE", "").strip()
    if image:
        tags["cnnflow.image"] = image
    if runner == "dvc" or os.environ.get("DVC_STAGE"):
        tags.update(dvc_lock_info(os.environ.get("DVC_STAGE") or stage, lock_path))
    kfp_run = os.environ.get("KFP_RUN_ID")
    if kfp_run:
        tags["cnnflow.kfp_run_id"] = kfp_run
    if dataset_version:
        tags[DATASET_TAG] = dataset_version
    if world_size is not None:
        tags["cnnflow.world_size"] = str(world_size)
    for name, value in (degrees or {}).items():
        tags[f"cnnflow.parallel.{name}"] = str(value)
    tags.update(runtime_info())
    return tags


def stringify(values: dict[str, Any]) -> dict[str, str]:
    """MLflow params and tags are strings; lists and None are written as JSON."""
    out = {}
    for key, value in values.items():
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out
