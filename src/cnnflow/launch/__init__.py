"""Launch the training entrypoint as a Kubeflow `PyTorchJob` (kubeflow.org/v1) or
`TrainJob` (trainer.kubeflow.org/v1alpha1), by launch.kind.

    from cnnflow.launch.pytorchjob import render_job
    from cnnflow.launch.local import run_local          # same spec, local processes
    from cnnflow.launch.kubernetes import launch_job    # same spec, on a cluster
    launch_training(params, shards="data/shards", run_id=rid)   # resolve, render, run

- `config`: `LaunchConfig`, the `launch` section (image, replicas, resources, policies).
- `pytorchjob`: render the job (kubeflow-training SDK models) and its params ConfigMap.
- `trainjob`: the same launch spec as a TrainJob (kubeflow-trainer-api models).
- `local`: run a rendered spec as one process group per replica, with exactly the
  environment the training operator injects; `trainjob_local`: a TrainJob, with the
  environment the Trainer's torch plugin injects.
- `kubernetes`: create, watch, stream the master's (node 0's) log, clean up;
  `trainjob_cluster`: what differs for a TrainJob (runtime check, conditions, pods).
- `validate`: the operator's admission rules plus Kubernetes JSON schemas.

One channel into the pods: `resolve_job` fixes the final config (shards, output and
checkpoint directories as the pods see them, the tracking URI) and the job's params
ConfigMap carries it, once; the pods' argv is only `--params FILE`.

This package imports nothing heavy at import time: `LaunchConfig` is cheap to load.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cnnflow.config import Params
    from cnnflow.configs.launch import LaunchConfig
    from cnnflow.launch.pytorchjob import RenderedJob
    from cnnflow.launch.trainjob import RenderedTrainJob


@dataclass
class LaunchResult:
    """Where a finished training job left its outputs (paths as this process sees them)."""

    backend: str
    name: str
    out_dir: str
    checkpoint_dir: str


def local_mounts(cfg: LaunchConfig, cwd: str = ".") -> dict[str, str]:
    """launch.local_mounts as {mountPath: dir}; by default the claim's mount_path -> cwd."""
    pairs = dict(item.split("=", 1) for item in cfg.local_mounts)
    return pairs or {cfg.mount_path: cwd}


def run_paths(root: str, name: str) -> tuple[str, str]:
    """(out_dir, checkpoint_dir) of job `name` under `root` (the claim's mount path)."""
    run_dir = f"{root.rstrip('/')}/runs/{name}"
    return f"{run_dir}/train", f"{run_dir}/checkpoints"


def _under(path: str, workspace: Path, root: str) -> str:
    """`path` (as this process sees it) as seen under `root`, when it lies in `workspace`;
    anything else (a URI, a path outside the workspace) unchanged."""
    if "://" in path:
        return path
    try:
        rel = Path(path).resolve().relative_to(workspace.resolve())
    except ValueError:
        return path
    return f"{root.rstrip('/')}/{rel.as_posix()}" if rel.parts else root


def resolve_job(params: Params, *, name: str, shards: str, workspace: Path,
                root: str, cluster: bool) -> Params:
    """The config job `name`'s pods train with: train.shards (launch.dataset_uri, else
    `shards` as the pods see it), train.out_dir and checkpoint.dir under
    <root>/runs/<name>/, and the tracking store: a sqlite file in the workspace as the pods
    see it, or (`cluster`, no tracking.uri) launch.tracking_uri.

    `root` is the claim's mount path on a cluster and its local directory for the local
    backend, whose replicas are processes here.
    """
    out_dir, ckpt_dir = run_paths(root, name)
    uri = params.tracking.uri or (params.launch.tracking_uri if cluster else "")
    if uri.startswith("sqlite:///"):
        uri = "sqlite:///" + _under(uri[len("sqlite:///"):], workspace, root)
    return dataclasses.replace(
        params,
        train=dataclasses.replace(params.train, out_dir=out_dir, shards=(
            params.launch.dataset_uri or _under(shards, workspace, root))),
        checkpoint=dataclasses.replace(params.checkpoint, dir=ckpt_dir),
        tracking=dataclasses.replace(params.tracking, uri=uri))


def identity() -> dict[str, str]:
    """This process's run identity, for the pods' environment: the KFP run and runner it
    belongs to, the MLflow workspace and auth provider KFP's MLflow plugin set (never its
    credentials: they would stand in clear in the job), and the code it runs (git commit
    and dirty flag)."""
    from cnnflow.tracking.lineage import GIT_COMMIT_ENV, GIT_DIRTY_ENV, git_info

    env = {name: os.environ[name] for name in ("KFP_RUN_ID", "CNNFLOW_RUNNER",
                                               "MLFLOW_WORKSPACE", "MLFLOW_TRACKING_AUTH")
           if os.environ.get(name)}
    git = git_info()
    if git:
        env[GIT_COMMIT_ENV], env[GIT_DIRTY_ENV] = git["cnnflow.git_commit"], \
            git["cnnflow.git_dirty"]
    return env


def plan_job(params: Params, *, shards: str = "", workspace: str | Path = ".",
             run_id: str = "", parent_run_id: str = "",
             mounts: Mapping[str, str] | None = None, pod_view: bool = False,
             ) -> tuple[RenderedJob | RenderedTrainJob, Params, dict[str, str]]:
    """(the rendered job (a PyTorchJob or TrainJob, by launch.kind), the final config in
    its ConfigMap, the local mounts).

    `shards` (default train.shards, else shard.out_dir) is a path as this process sees it,
    in `workspace` (the directory the claim is mounted at, or plays it). The pods see the
    claim at launch.mount_path on a cluster; for the local backend (unless `pod_view`)
    at its local directory, `mounts` (default `local_mounts(cfg, workspace)`), since the
    replicas are processes here.
    """
    import yaml

    from cnnflow.config import to_dict
    from cnnflow.launch.pytorchjob import job_name, render_job

    cfg, ws = params.launch, Path(workspace)
    shards = shards or params.train.shards or params.shard.out_dir
    name = job_name(cfg.name_prefix, run_id)
    mounts = dict(mounts or local_mounts(cfg, str(ws)))
    local = mounts.get(cfg.mount_path) or mounts.get(cfg.volume_claim) or str(ws)
    cluster = pod_view or cfg.backend == "kubernetes"
    root = cfg.mount_path if cluster else str(Path(local).resolve())
    final = resolve_job(params, name=name, shards=shards, workspace=ws, root=root,
                        cluster=cluster)
    text = yaml.safe_dump(to_dict(final), sort_keys=False)
    if cfg.kind == "trainjob":
        from cnnflow.launch.trainjob import render_trainjob as render_job
    rendered = render_job(cfg, name=name, run_id=run_id, params_yaml=text,
                          parent_run_id=parent_run_id, identity=identity())
    return rendered, final, mounts


def launch_training(params: Params, *, shards: str = "", workspace: str | Path = ".",
                    run_id: str = "", parent_run_id: str = "", api: Any = None,
                    mounts: Mapping[str, str] | None = None,
                    echo: Callable[[str], None] | None = None) -> LaunchResult:
    """Resolve the job's config, render the train step's job (launch.kind) and run it
    with launch.backend (arguments as for `plan_job`).

    kubernetes: `api` is a kubernetes ApiClient (default: `api_client()`), outputs are on
    the PVC. local: the job's replicas run here. Raises `LaunchError` (a CnnflowError) when
    the job does not succeed.
    """
    from cnnflow.launch.kubernetes import LaunchError

    rendered, final, mounts = plan_job(params, shards=shards, workspace=workspace,
                                       run_id=run_id, parent_run_id=parent_run_id,
                                       mounts=mounts)
    name, out_dir, ckpt_dir = rendered.name, final.train.out_dir, final.checkpoint.dir
    if params.launch.backend == "kubernetes":
        from cnnflow.launch.kubernetes import api_client, launch_job

        launch_job(rendered, api=api or api_client(), keep=params.launch.keep_job, sink=echo)
        return LaunchResult("kubernetes", name, out_dir, ckpt_dir)
    if params.launch.kind == "trainjob":
        from cnnflow.launch.trainjob_local import LocalTrainJob as LocalJob
    else:
        from cnnflow.launch.local import LocalJob

    result = LocalJob(rendered, mounts=mounts, echo=echo).run()
    if not result.succeeded:
        kind = rendered.documents()[-1]["kind"]
        error = LaunchError(f"{kind} {name} failed locally: {result.reason}")
        if result.stopped:  # preempted: 143/130, as the replicas exit (retryable)
            error.exit_code = result.exit_code
        raise error
    return LaunchResult("local", name, out_dir, ckpt_dir)
