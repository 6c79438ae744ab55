"""DDP on 2 and 4 processes, gradient accumulation, pipeline, dp x pp, FSDP and HSDP with
real torchrun process groups (gloo on CPU).

One data set, one tiny model (small_cnn depth 3: 4 pipeline blocks, GroupNorm), one
global batch and 4 data streams (augmentation on) for every configuration, so the losses
must agree with one process's: the world size, the strategy and grad_accum change how a
step is computed, never what it computes. FSDP and dp x pp train 10 steps, checkpoint,
and a second launch resumes to step 20; the others run to step 20 in one launch.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from cnnflow.config import ParallelConfig
from cnnflow.distributed.mesh import resolve_degrees
from cnnflow.distributed.parallelize import check_supported
from cnnflow.distributed.pipeline import bubble_fraction, microbatch_count, partition
from cnnflow.errors import ConfigError
from tests.distributed.harness import read_jsonl, run_torchrun, write_params

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = ["model.norm=group", "model.groups=4", "model.width=8", "model.depth=3",
        "train.streams=4", "train.epochs=1", "train.threads=1", "optim.schedule=constant",
        "checkpoint.every_steps=0"]
RUNS = {  # name: (processes, overrides, resumed halfway)
    "ddp2": (2, [], False),
    "ddp4": (4, [], False),
    "ddp2_accum2": (2, ["train.grad_accum=2"], False),  # no_sync between micro-batches
    "pp2_gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe",
                      "parallel.microbatches=4"], False),
    "fsdp2": (2, ["parallel.fsdp=2"], True),
    "dp2_pp2_1f1b": (4, ["parallel.dp=2", "parallel.pp=2", "parallel.split_points=[blocks.2]"],
                     True),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved1f1b"], False),
    "hsdp_2x2": (4, ["parallel.dp=2", "parallel.fsdp=2"], False),
}


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _launch(nproc, digits_shards, work, overrides, steps):
    work.mkdir(parents=True, exist_ok=True)
    params = write_params(work / f"p{steps}.yaml", digits_shards, work,
                          [*TINY, f"train.max_steps={steps}", *overrides])
    return _ok(run_torchrun(nproc, params))


def _loss_at(work, step: int) -> float:
    return {r["step"]: r["loss"] for r in read_jsonl(work / "out" / "steps.jsonl")}[step]


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory):
    """Every configuration trained to step 20 (most via a resume at step 10)."""
    base = tmp_path_factory.mktemp("parallel")
    out = {"single": base / "single"}
    _launch(1, digits_shards, out["single"], [], 20)
    logs = {}
    for name, (nproc, overrides, resumed) in RUNS.items():
        work = out[name] = base / name
        if resumed:
            _launch(nproc, digits_shards, work, overrides, 10)
        logs[name] = _launch(nproc, digits_shards, work, overrides, 20).stderr
    return out, logs


def test_every_strategy_matches_one_process_within_1e5(runs):
    out, logs = runs
    ref = _loss_at(out["single"], 20)
    figures = {name: _loss_at(out[name], 20) for name in RUNS}
    print("loss at step 20:", ref, figures)
    for name, loss in figures.items():
        assert abs(loss - ref) / ref < 1e-5, (name, loss, ref)
    for name, (_, _, resumed) in RUNS.items():
        assert ("resumed from" in logs[name]) == resumed, name
    ckpts = sorted(p.name for p in (out["fsdp2"] / "ckpt").iterdir())
    assert "step-00000020" in ckpts and (out["fsdp2"] / "ckpt" / "step-00000020" /
                                         "meta.pt").is_file()


def test_plan_is_printed_per_rank(runs):
    _, logs = runs
    text = logs["dp2_pp2_1f1b"]
    assert "plan: dp x pp on mesh pp=2 x dp=2 x fsdp=1" in text
    for rank in range(4):
        assert f"plan: rank {rank} " in text
    assert "stage 0: blocks.0..blocks.1" in text and "stage 1: blocks.2..head" in text
    assert f"bubble {bubble_fraction(2, 4):.3f}" in text  # 1/5 with 4 micro-batches
    assert "shard 2/2 of every block" in logs["hsdp_2x2"]


def test_consolidated_model_loads_into_single_device_model_and_scores_the_same(
        runs, digits_shards):
    from cnnflow.data.manifest import read_manifest
    from cnnflow.distributed.compute import evaluate
    from cnnflow.models import model_from_config_dict
    from cnnflow.train.data import eval_batches

    out, _ = runs
    norm = read_manifest(str(digits_shards))["normalize"]
    for name in ("single", *RUNS):
        meta = json.loads((out[name] / "out" / "model.json").read_text())
        model = model_from_config_dict(meta["model"])
        model.load_state_dict(torch.load(out[name] / "out" / "model.pt"), strict=True)
        scored = evaluate(model, eval_batches(
            str(digits_shards), "val", batch_size=256, rank=0, world_size=1,
            mean=norm["mean"], std=norm["std"], expected_version=None), torch.device("cpu"))
        logged = read_jsonl(out[name] / "out" / "metrics.jsonl")[-1]
        assert logged["step"] == 20
        assert abs(scored["loss"] - logged["val_loss"]) < 1e-5, (name, scored, logged)
        assert scored["accuracy"] == pytest.approx(logged["val_accuracy"]), name


def test_a_pipeline_checkpoint_resumes_under_fsdp(runs, digits_shards, tmp_path):
    """DCP state is keyed by the single-device names: pp=2's checkpoint resumes as fsdp=2;
    a DDP run refuses it by name."""
    import shutil

    out, _ = runs
    work = tmp_path / "cross"
    (work / "ckpt").mkdir(parents=True)
    shutil.copytree(out["pp2_gpipe"] / "ckpt" / "step-00000020", work / "ckpt" / "step-00000020")
    proc = _launch(2, digits_shards, work, ["parallel.fsdp=2", "train.epochs=2"], 24)
    assert "resumed from" in proc.stderr and "at step 20" in proc.stderr
    ddp_params = write_params(tmp_path / "d.yaml", digits_shards, work,
                              [*TINY, "train.max_steps=30"])
    bad = run_torchrun(2, ddp_params)
    assert bad.returncode != 0
    assert "checkpoint of a fsdp run, this run is ddp" in bad.stderr, bad.stderr[-3000:]


# ---------------------------------------------------------------- bad input, in-process


def _model():
    from cnnflow.config import ModelConfig
    from cnnflow.models import build_model

    return build_model(ModelConfig(depth=3, width=8, norm="group", groups=4),
                       in_shape=(8, 8, 1), num_classes=10)


def test_degrees_that_do_not_multiply_to_the_world_size():
    with pytest.raises(ConfigError, match=r"parallel\.dp x pp x fsdp = 2 x 2 x 1 = 4: "
                                          r"expected the world size 2"):
        resolve_degrees(ParallelConfig(dp=2, pp=2), 2)
    with pytest.raises(ConfigError, match=r"parallel\.pp=3 x parallel\.fsdp=1 = 3: expected a "
                                          r"divisor of the world size 4"):
        resolve_degrees(ParallelConfig(pp=3), 4)
    d = resolve_degrees(ParallelConfig(pp=2), 4, rank=3)
    assert (d.dp, d.strategy, d.coords, d.data_rank, d.data_world) == (
        2, "dp x pp", {"pp": 1, "dp": 1, "fsdp": 0}, 1, 2)


def test_pipeline_split_errors_name_the_value():
    with pytest.raises(ConfigError, match=r"5 pipeline stages need at least 5 blocks; this "
                                          r"model has 4 \(blocks\.0, blocks\.1, blocks\.2, head"):
        partition(_model(), 5, split_points=[], by="flops", in_shape=(8, 8, 1))
    with pytest.raises(ConfigError, match=r"split_points: 'stage2\.0' names no block; "
                                          r"expected names from blocks\.1, blocks\.2, head"):
        partition(_model(), 2, split_points=["stage2.0"], by="flops", in_shape=(8, 8, 1))
    with pytest.raises(ConfigError, match=r"split_points"):
        ParallelConfig(pp=2, split_points=["blocks.1", "blocks.2"])
    parts = partition(_model(), 2, split_points=[], by="params", in_shape=(8, 8, 1))
    assert [p[0] for p in parts] == ["blocks.0", "blocks.2"]  # 1272 vs 5002 parameters


def test_microbatches_must_divide_the_replica_batch():
    with pytest.raises(ConfigError, match=r"parallel\.microbatches=3: expected a divisor of the "
                                          r"per-replica batch 32 = train.batch_size 64 / "
                                          r"\(dp 2 x grad_accum 1\)"):
        microbatch_count(ParallelConfig(pp=2, microbatches=3), 64, 1, 2)
    assert microbatch_count(ParallelConfig(pp=2), 64, 1, 2) == 4


def test_settings_a_strategy_cannot_run_are_refused():
    from cnnflow.config import params_from_dict

    p = params_from_dict({"parallel": {"fsdp": 2, "comm_hook": "bf16"}})
    with pytest.raises(ConfigError, match=r"parallel\.comm_hook='bf16': a DDP hook; expected "
                                          r"'none' with fsdp"):
        check_supported(p.parallel, resolve_degrees(p.parallel, 2))
    with pytest.raises(ConfigError, match=r"parallel\.fsdp=2 with parallel\.pp=2: .*expected "
                                          r"fsdp=1 when pp > 1"):
        resolve_degrees(ParallelConfig(pp=2, fsdp=2), 4)


def test_bad_pipeline_setting_is_one_line_per_rank(digits_shards, tmp_path):
    params = write_params(tmp_path / "p.yaml", digits_shards, tmp_path,
                          [*TINY, "parallel.pp=2", "parallel.split_points=[nope]"])
    proc = run_torchrun(2, params)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "cnnflow: error:" in ln]
    assert len(lines) == 2 and all("'nope' names no block" in ln for ln in lines), \
        proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr  # torchrun itself prints its own
