"""`cnnflow lineage models:/cnnflow@champion`: where a registered version came from.

    for line in lineage_lines(model_lineage("models:/cnnflow@champion")):
        print(line)

One call gathers what the registry and the runs hold about a version: the code (git commit
and dirty flag), the data (dataset version and the shard manifest's sha256), the runner,
world size and parallel degrees, the image, the test metrics, the train, evaluate and
pipeline runs, and ends with the command that reruns it with the same runner.
"""

from __future__ import annotations

import shlex
from typing import Any

from cnnflow.errors import CnnflowError

# params that name where things are on one machine: a rerun sets its own
PLACES = ("out_dir", "shards", "path", "dir", "uri", "spool_dir", "model", "local_mounts",
           "dataset_uri", "tracking_uri")
_RERUN = {
    "kfp-local": "cnnflow pipeline run",
    "kfp": "cnnflow pipeline submit --host <KFP endpoint>",
    "dvc": "dvc repro",
    "cli": "cnnflow train",
}


def _version(client, uri: str):
    from cnnflow.tracking.registry import _parse_registry_uri, get_version

    parsed = _parse_registry_uri(uri)
    if parsed is None:
        raise CnnflowError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<n>")
    name, number, alias = parsed
    return get_version(client, name, version=number, alias=alias)


def model_lineage(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Everything `lineage_lines` prints, as a dict."""
    from mlflow.exceptions import MlflowException

    from cnnflow.config import Params, flatten
    from cnnflow.tracking.lineage import DATASET_TAG, stringify
    from cnnflow.tracking.registry import _client

    client, _ = _client(tracking_uri)
    mv = _version(client, uri)
    tags = dict(mv.tags)
    aliases = sorted(client.get_registered_model(mv.name).aliases or {})
    aliases = [a for a in aliases
               if str(client.get_model_version_by_alias(mv.name, a).version) == str(mv.version)]
    train_id = tags.get("cnnflow.train_run_id") or mv.run_id
    try:
        train = client.get_run(train_id) if train_id else None
    except MlflowException:
        train = None
    params = train.data.params if train else {}
    runner = tags.get("cnnflow.runner", "cli")
    defaults = {k: stringify({k: v})[k] for k, v in flatten(Params()).items()}
    changed = {k: v for k, v in sorted(params.items())
               if k in defaults and v != defaults[k] and not k.endswith(PLACES)}
    commit = tags.get("cnnflow.git_commit", "")
    rerun = _RERUN.get(runner, "cnnflow train")
    if runner != "dvc":  # dvc repro reads params.yaml of the commit itself
        rerun += "".join(f" --set {shlex.quote(f'{k}={v}')}" for k, v in changed.items())
    if commit:
        rerun = f"git checkout {commit} && {rerun}"
    return {
        "name": mv.name, "version": str(mv.version), "aliases": aliases,
        "git_commit": commit, "git_dirty": tags.get("cnnflow.git_dirty", "unknown"),
        "dataset_version": tags.get(DATASET_TAG, ""),
        "shards_sha256": tags.get("cnnflow.shards_sha256", ""),
        "runner": runner, "world_size": tags.get("cnnflow.world_size", ""),
        "degrees": {d: tags.get(f"cnnflow.parallel.{d}", "") for d in ("dp", "pp", "fsdp")},
        "image": tags.get("cnnflow.image", ""),
        "metrics": {k: float(v) for k, v in sorted(tags.items()) if k.startswith("test.")},
        "train_run_id": train_id or "",
        "evaluate_run_id": tags.get("cnnflow.evaluate_run_id", ""),
        "pipeline_run_id": (train.data.tags.get("mlflow.parentRunId", "") if train else ""),
        "changed_params": changed, "rerun": rerun,
    }


def lineage_lines(info: dict[str, Any]) -> list[str]:
    """The lines `cnnflow lineage` prints."""
    aliases = ", ".join(f"@{a}" for a in info["aliases"]) or "no alias"
    dirty = {"true": "dirty: uncommitted changes", "false": "clean"}.get(
        info["git_dirty"], "dirty: unknown")
    d = info["degrees"]
    metrics = ", ".join(f"{k} {info['metrics'][k]:.4f}"
                        for k in ("test.accuracy", "test.macro_f1", "test.ece")
                        if k in info["metrics"]) or "none"
    return [
        f"model     {info['name']} v{info['version']} ({aliases})",
        f"code      git {info['git_commit'] or 'unknown'} ({dirty})",
        f"data      dataset {info['dataset_version'] or 'unknown'}",
        f"shards    manifest sha256 {info['shards_sha256'] or 'unknown'}",
        f"runner    {info['runner']}, world size {info['world_size'] or '?'} "
        f"(dp {d['dp'] or '?'}, pp {d['pp'] or '?'}, fsdp {d['fsdp'] or '?'})"
        + (f", image {info['image']}" if info["image"] else ""),
        f"metrics   {metrics}",
        f"runs      train {info['train_run_id'] or '?'}, evaluate "
        f"{info['evaluate_run_id'] or '?'}, pipeline {info['pipeline_run_id'] or 'none'}",
        f"rerun     {info['rerun']}",
    ]
