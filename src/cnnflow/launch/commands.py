"""`cnnflow launch`: what its forms do, so that the CLI only parses arguments.

    cnnflow launch render [--set launch.nodes=2]     # the train step's job, as YAML
    cnnflow launch render --set launch.kind=trainjob # ... as a Trainer v2 TrainJob
    cnnflow launch train                             # render it, run it with launch.backend
    cnnflow launch job.yaml --local [--mount /workspace=.]   # any PyTorchJob or TrainJob, here
    cnnflow launch job.yaml                          # any PyTorchJob or TrainJob, on the cluster

A job file's kind (PyTorchJob or TrainJob) picks the backend's runner.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cnnflow.config import Params
from cnnflow.errors import ConfigError
from cnnflow.launch import launch_training, local_mounts, plan_job
from cnnflow.tracking.mlflow_tracker import PARENT_ENV, TASK_RUN_ENV


def parse_mounts(items: Sequence[str]) -> dict[str, str]:
    """`--mount mountPath=DIR` pairs; one line naming the item when one has no `=`."""
    out: dict[str, str] = {}
    for item in items:
        path, sep, local = item.partition("=")
        if not sep or not path.startswith("/") or not local:
            raise ConfigError(f"--mount {item!r}: expected mountPath=DIR, e.g. "
                              f"--mount /workspace=.")
        out[path] = local
    return out


def launch_command(job: str, params: Params, *, local: bool, mounts: Sequence[str],
                   kubeconfig: str | None, run_id: str) -> str:
    """Do what `cnnflow launch JOB` asks; return what it prints (or exit with the local
    job's exit code)."""
    # under KFP's MLflow plugin the step's task run is the parent, as for the train step
    parent = os.environ.get(TASK_RUN_ENV, "").strip() or os.environ.get(PARENT_ENV, "")
    pairs = parse_mounts(mounts) or local_mounts(params.launch)
    if job == "render":
        rendered, _, _ = plan_job(params, run_id=run_id, parent_run_id=parent, mounts=pairs,
                                  pod_view=True)
        return rendered.to_yaml()
    if job == "train":
        api = None
        if params.launch.backend == "kubernetes":
            from cnnflow.launch.kubernetes import api_client

            api = api_client(kubeconfig)
        result = launch_training(params, run_id=run_id, parent_run_id=parent, api=api,
                                 mounts=pairs)
        kind = "TrainJob" if params.launch.kind == "trainjob" else "PyTorchJob"
        return f"{kind} {result.name} succeeded -> {result.out_dir}\n"
    from cnnflow.launch.validate import load_documents

    docs = load_documents(job)
    kind = "TrainJob" if any(d.get("kind") == "TrainJob" for d in docs) else "PyTorchJob"
    if local:
        if kind == "TrainJob":
            from cnnflow.launch.trainjob_local import run_local
        else:
            from cnnflow.launch.local import run_local

        raise SystemExit(run_local(docs, mounts=pairs))
    from cnnflow.launch.kubernetes import api_client, launch_job

    outcome = launch_job(docs, api=api_client(kubeconfig), keep=params.launch.keep_job)
    return f"{kind} {outcome.namespace}/{outcome.name} succeeded\n"
