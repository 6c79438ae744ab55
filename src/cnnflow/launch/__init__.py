"""Launch the training entrypoint as a Kubeflow `PyTorchJob` (kubeflow.org/v1).

    from cnnflow.launch.pytorchjob import render_job, to_yaml
    from cnnflow.launch.local import run_local          # same spec, local processes
    from cnnflow.launch.kubernetes import launch_job    # same spec, on a cluster
    launch_training(cfg, params_yaml=text, run_id=rid)  # render + run with cfg.backend

- `config`: `LaunchConfig`, the `launch` section (image, replicas, resources, policies).
- `pytorchjob`: render the job (kubeflow-training SDK models) and its params ConfigMap.
- `local`: run a rendered spec as one process group per replica, with exactly the
  environment the training operator injects.
- `kubernetes`: create, watch, stream the master's log, clean up.
- `validate`: the operator's admission rules plus Kubernetes JSON schemas.

This package imports nothing heavy at import time: `LaunchConfig` is cheap to load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cnnflow.launch.config import LaunchConfig


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


def launch_training(cfg: LaunchConfig, *, params_yaml: str, run_id: str = "",
                    parent_run_id: str = "", overrides: Sequence[str] = (),
                    api: Any = None, mounts: Mapping[str, str] | None = None,
                    echo: Callable[[str], None] | None = None) -> LaunchResult:
    """Render the train step's PyTorchJob and run it with `cfg.backend`.

    kubernetes: `api` is a kubernetes ApiClient (default: `api_client()`), outputs are on
    the PVC. local: `mounts` (default `local_mounts(cfg)`) maps the PVC to a directory.
    Raises `LaunchError` (a CnnflowError) when the job does not succeed.
    """
    from cnnflow.launch.kubernetes import LaunchError
    from cnnflow.launch.pytorchjob import render_job

    rendered = render_job(cfg, run_id=run_id, params_yaml=params_yaml,
                          parent_run_id=parent_run_id, overrides=overrides)
    if cfg.backend == "kubernetes":
        from cnnflow.launch.kubernetes import api_client, launch_job

        launch_job(rendered, api=api or api_client(), keep=cfg.keep_job, sink=echo)
        return LaunchResult("kubernetes", rendered.name, rendered.out_dir,
                            rendered.checkpoint_dir)
    from cnnflow.launch.local import LocalJob

    mounts = dict(mounts or local_mounts(cfg))
    result = LocalJob(rendered, mounts=mounts, echo=echo).run()
    if not result.succeeded:
        raise LaunchError(f"PyTorchJob {rendered.name} failed locally: {result.reason}")
    local = mounts.get(cfg.mount_path) or mounts.get(cfg.volume_claim) or cfg.mount_path

    def here(path: str) -> str:
        return local + path[len(cfg.mount_path):] if path.startswith(cfg.mount_path) else path

    return LaunchResult("local", rendered.name, here(rendered.out_dir),
                        here(rendered.checkpoint_dir))
