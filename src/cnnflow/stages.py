"""The pipeline's stages with their MLflow child runs: what the CLI, the DVC stages and
the KFP components all call.

Each `run_*` takes the resolved `Params`, opens a child run of the pipeline's parent run
(`CNNFLOW_PARENT_RUN_ID`, or a new parent), logs the stage's flattened config and lineage
tags, does the work with the plain library function, and closes the run FINISHED or
FAILED. With `tracking.enabled: false` nothing is logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from cnnflow import storage
from cnnflow.config import Params, flatten
from cnnflow.fileio import write_json
from cnnflow.outputs import SPOOL, claim_output, mark_output, nested_name
from cnnflow.tracking import NullTracker
from cnnflow.tracking.lineage import DATASET_TAG

log = logging.getLogger("cnnflow")


def _degrees(params: Params, world_size: int) -> dict[str, int]:
    pc = params.parallel
    dp = pc.dp or max(1, world_size // max(1, pc.pp * pc.fsdp))
    return {"dp": dp, "pp": pc.pp, "fsdp": pc.fsdp}


@contextmanager
def stage_tracker(params: Params, stage: str, *, out_dir: str | Path,
                  dataset_version: str | None = None, world_size: int = 1) -> Iterator[Any]:
    """A child run for `stage` of the pipeline's parent run, or of KFP's task run under
    its MLflow plugin (`$MLFLOW_RUN_ID`); a NullTracker when tracking is off or on
    ranks > 0."""
    tc = params.tracking
    if not tc.enabled or int(os.environ.get("RANK", "0")) != 0:
        yield NullTracker()
        return
    from cnnflow.tracking.mlflow_tracker import stage_run

    tracker = stage_run(
        stage, params=flatten(params), experiment=tc.experiment, tracking_uri=tc.uri or None,
        dataset_version=dataset_version, world_size=world_size,
        degrees=_degrees(params, world_size),
        spool_dir=tc.spool_dir or Path(out_dir) / SPOOL,
        log_system_metrics=tc.log_system_metrics, offline=tc.offline,
        timeout_s=tc.check_timeout_s,
    )
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        tracker.fail("interrupted")
        raise
    except Exception as exc:
        tracker.fail(str(exc) or type(exc).__name__)
        raise
    finally:
        tracker.close(status)
        if tracker.buffering:
            log.warning("MLflow was unreachable during %s: its records are kept in %s; "
                        "upload them with `cnnflow tracking sync %s`", stage,
                        tracker.spool_dir, tracker.spool_dir)


def run_prepare(params: Params) -> dict[str, Any]:
    from cnnflow.data.prepare import prepare

    cfg = params.prepare
    claim_output("prepare", "prepare.out_dir", cfg.out_dir, inputs={"prepare.path": cfg.path})
    with stage_tracker(params, "prepare", out_dir=cfg.out_dir) as tracker:
        meta = prepare(cfg)
        tracker.set_tags({DATASET_TAG: meta["version"]})
        tracker.log_metrics({f"{s}_count": float(meta["splits"][s]["count"])
                             for s in ("train", "val", "test")}, step=0)
        tracker.log_artifact(Path(cfg.out_dir) / "dataset.json", "data")
    return meta


def run_shard(params: Params) -> dict[str, Any]:
    from cnnflow.data.shards import write_shards

    out = params.shard.out_dir
    claim_output("shard", "shard.out_dir", out,
                 inputs={"prepare.out_dir": params.prepare.out_dir})
    with stage_tracker(params, "shard", out_dir=out) as tracker:
        manifest = write_shards(params.prepare.out_dir, out,
                                samples_per_shard=params.shard.samples_per_shard,
                                workers=params.shard.workers)
        tracker.set_tags({DATASET_TAG: manifest["dataset_version"]})
        tracker.log_metrics({"shards": float(sum(len(s["shards"])
                                                 for s in manifest["splits"].values()))}, 0)
        tracker.log_artifact(storage.local_dir(out, "shards") / "manifest.json", "data")
        tracker.log_dataset(out, context="shards")
    return manifest


def run_train(params: Params) -> dict[str, Any]:
    """Train in this process (one rank of torchrun / a PyTorchJob, or a world of 1). An
    object storage train.out_dir is written locally and uploaded at the end (rank 0)."""
    shards = params.train.shards or params.shard.out_dir
    _claim_train(params, shards)
    from cnnflow.data.manifest import read_manifest

    world = int(os.environ.get("WORLD_SIZE", "1"))
    main = int(os.environ.get("RANK", "0")) == 0
    version = None
    if params.tracking.enabled and main:
        version = read_manifest(shards)["dataset_version"]
    with storage.local_output(params.train.out_dir, "train", publish=main) as out:
        return _train_into(params, replace(params, train=replace(params.train, out_dir=str(
            out))), shards, version, world)


def _train_into(given: Params, params: Params, shards: str, version: str | None,
                world: int) -> dict[str, Any]:
    """run_train with train.out_dir a local directory (`given`: the params as set)."""
    from cnnflow.data.manifest import manifest_sha256
    from cnnflow.train.trainer import train

    tc = params.train
    with stage_tracker(given, "train", out_dir=tc.out_dir, dataset_version=version,
                       world_size=world) as tracker:
        tracker.log_dataset(shards, context="train")
        if tracker.run_id is not None:
            tracker.set_tags({SHARDS_TAG: manifest_sha256(shards)})
        summary = train(params, tracker=tracker)
        info = tracker.log_model(tc.out_dir)
        if tracker.run_id is not None:  # a tracked run (not tracking.enabled=false, rank > 0)
            record = {"run_id": tracker.run_id,
                      "model_uri": info.model_uri if info else None}
            write_json(Path(tc.out_dir) / "mlflow.json", record)
    return summary


def _claim_train(params: Params, shards: str) -> None:
    """Check train.out_dir and checkpoint.dir on every rank (nothing is written yet, so
    all ranks agree); rank 0 marks them."""
    tc, cc = params.train, params.checkpoint
    key = "train.shards" if tc.shards else "shard.out_dir"
    nested = nested_name(cc.dir, tc.out_dir)  # checkpoint.dir=<train.out_dir>/ckpt is fine
    claim_output("train", "train.out_dir", tc.out_dir, inputs={key: shards},
                 apart={} if nested else {"checkpoint.dir": cc.dir},
                 holds=(nested,) if nested else ())
    claim_output("checkpoint", "checkpoint.dir", cc.dir, inputs={key: shards},
                 apart={} if nested else {"train.out_dir": tc.out_dir})
    if int(os.environ.get("RANK", "0")) == 0:
        mark_output("train", tc.out_dir)
        mark_output("checkpoint", cc.dir)


def run_evaluate(params: Params, model: str = "") -> dict[str, Any]:
    """Score the model on the test split; register it as @challenger; run the gate; put the
    result on the pipeline's parent run."""
    from cnnflow.data.manifest import manifest_sha256, read_manifest
    from cnnflow.evaluate import evaluate

    ec, tc = params.evaluate, params.tracking
    shards = params.train.shards or params.shard.out_dir
    given = model or ec.model or params.train.out_dir
    reads = {"train.shards" if params.train.shards else "shard.out_dir": shards,
             "the model": "" if "://" in given or ":/" in given else given,
             "train.out_dir": params.train.out_dir}
    claim_output("evaluate", "evaluate.out_dir", ec.out_dir, inputs=reads)
    source = storage.local_input(given, "model", "train output (model.pt)")
    train_dir = source if params.train.out_dir == given else _train_dir(params.train.out_dir)
    version = read_manifest(shards)["dataset_version"]
    mark_output("evaluate", ec.out_dir)
    with stage_tracker(params, "evaluate", out_dir=ec.out_dir,
                       dataset_version=version) as tracker:
        metrics = evaluate(source, shards, ec.out_dir, tracker=tracker, top_k=ec.top_k,
                           batch_size=ec.batch_size, max_misclassified=ec.max_misclassified,
                           tracking_uri=tc.uri or None, model_uri=str(given))
        curves = training_curves(train_dir, Path(ec.out_dir) / "plots")
        if curves:
            tracker.log_artifact(curves, "reports/plots")
        result: dict[str, Any] = {"metrics": metrics}
        if tc.enabled:
            tracker.set_tags({SHARDS_TAG: manifest_sha256(shards)})
            result.update(_register(params, source, metrics, tracker))
            tracker.summarize_parent(params=_key_params(params), metrics={
                f"test/{k}": metrics[k] for k in TEST_METRICS}, tags=_result_tags(result))
    return result


TEST_METRICS = ("accuracy", "top_k_accuracy", "macro_f1", "weighted_f1", "ece")
SHARDS_TAG = "cnnflow.shards_sha256"
REGISTERED_TAG = "cnnflow.registered_version"
_KEY_PARAMS = ("prepare.source", "model.name", "optim.name", "optim.lr", "train.epochs",
               "train.batch_size", "parallel.dp", "parallel.pp", "parallel.fsdp",
               "launch.nodes", "launch.nproc_per_node")


def _key_params(params: Params) -> dict[str, Any]:
    flat = flatten(params)
    return {k: flat[k] for k in _KEY_PARAMS}


def _result_tags(result: dict[str, Any]) -> dict[str, str]:
    reg, promo = result.get("registered"), result.get("promotion")
    tags = {"cnnflow.decision": promo["decision"] if promo else "none"}
    if reg:
        tags[REGISTERED_TAG] = f"{reg['name']}/{reg['version']}"
    return tags


def _register(params: Params, source: str, metrics: dict[str, Any], tracker: Any
              ) -> dict[str, Any]:
    """Register @challenger and run the promotion gate, unless this is not a run meant to
    (evaluate.register: false; a `dvc exp run`, a throwaway until applied)."""
    from cnnflow.tracking import registry

    ec, tc = params.evaluate, params.tracking
    if not ec.register:
        log.info("evaluate.register is false: the model is logged, not registered")
        return {}
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        log.info("dvc exp run: an experiment is logged, not registered (`dvc exp apply`, "
                 "then `dvc repro`, registers it)")
        tracker.set_tags({REGISTERED_TAG: "none (dvc experiment)"})
        return {}
    ref = _model_ref(source)
    if ref is None:
        log.warning("no logged model for %s (was MLflow unreachable during training?): "
                    "not registered", source)
        return {}
    reg = registry.register(ref, tc.model_name, metrics=metrics, tracking_uri=tc.uri or None,
                            tags={"cnnflow.evaluate_run_id": tracker.run_id or ""})
    tracker.set_tags({REGISTERED_TAG: f"{reg['name']}/{reg['version']}"})
    if reg.get("model_id"):
        tracker.log_model_metrics(reg["model_id"], {
            f"test/{k}": metrics[k] for k in TEST_METRICS}, shards=params.train.shards
            or params.shard.out_dir)
    out: dict[str, Any] = {"registered": reg}
    if ec.promote:
        out["promotion"] = registry.promote(
            tc.model_name, reg["version"], margin=ec.margin,
            promote_across_datasets=ec.promote_across_datasets, run_id=tracker.run_id,
            tracking_uri=tc.uri or None)
    return out


def _model_ref(source: str) -> str | None:
    """The MLflow reference of the model at `source` (a URI, or the train dir's record)."""
    if "://" in source or source.startswith(("models:/", "runs:/")):
        return source
    record = Path(source) / "mlflow.json"
    if not record.is_file():
        return None
    return json.loads(record.read_text()).get("model_uri")


def _train_dir(out_dir: str) -> str:
    """train.out_dir as a local directory for its curves; a remote one not (yet) complete
    has none to draw ("")."""
    try:
        return storage.local_input(out_dir, "model", "train output")
    except storage.StorageError as exc:
        log.warning("no training curves: %s", exc)
        return ""


def training_curves(train_dir: str | Path, plots: Path) -> Path | None:
    """metrics.jsonl as a CSV that `dvc plots` draws (one row per epoch) and as a PNG
    (loss and accuracy over epochs), which DVC and MLflow show without loading Vega;
    the PNG's path, or None without a metrics.jsonl."""
    src = Path(train_dir) / "metrics.jsonl"
    if not train_dir or not src.is_file():
        return None
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    from cnnflow.evaluate import plot_training

    keys = ["epoch", "step", "loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    plots.mkdir(parents=True, exist_ok=True)
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    (plots / "training.csv").write_text("\n".join(lines) + "\n")
    return plot_training(rows, plots / "training_curves.png")
