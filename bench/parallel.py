"""Parallel strategies side by side: ResNet-56 on synthetic CIFAR-shaped batches.

    .venv/bin/python bench/parallel.py                   # ~2-3 min on 2 cores
    .venv/bin/python bench/parallel.py --steps 10 --batch-size 128 --model resnet20

Runs one process, dp=2, pp=2 (GPipe and 1F1B with 4 and 8 micro-batches) and fsdp=2, each
as real gloo process groups with 1 intra-op thread per process, through the same
`parallelize` step the trainer uses. Prints samples/s (and the ratio to one process),
per-rank peak RSS, measured parameter+gradient+optimizer bytes per rank (and the ratio
to one process: FSDP's target is <= 0.6x), and for pipelines the measured idle share of
each rank against the theoretical bubble (K-1)/(M+K-1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

CONFIGS = [  # (label, processes, parallel overrides)
    ("1 process", 1, {}),
    ("dp=2", 2, {}),
    ("pp=2 gpipe M=4", 2, {"pp": 2, "pp_schedule": "gpipe", "microbatches": 4}),
    ("pp=2 gpipe M=8", 2, {"pp": 2, "pp_schedule": "gpipe", "microbatches": 8}),
    ("pp=2 1f1b M=4", 2, {"pp": 2, "pp_schedule": "1f1b", "microbatches": 4}),
    ("pp=2 1f1b M=8", 2, {"pp": 2, "pp_schedule": "1f1b", "microbatches": 8}),
    ("fsdp=2", 2, {"fsdp": 2}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(obj, name: str, busy: list[float]) -> None:
    """Add the seconds `obj.name(...)` takes to busy[0] (a stage's compute)."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            busy[0] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def _worker(rank: int, world: int, port: int, args, overrides: dict, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    from cnnflow.config import params_from_dict
    from cnnflow.distributed.env import init_distributed, shutdown
    from cnnflow.distributed.fsdp import state_bytes
    from cnnflow.distributed.parallelize import parallelize
    from cnnflow.models import build_model
    from cnnflow.train import loop

    params = params_from_dict({
        "model": {"name": args.model, "norm": "group", "groups": 8},
        "parallel": {"backend": "gloo", **overrides},
        "train": {"batch_size": args.batch_size, "threads": 1},
    })
    env = init_distributed("gloo", 120.0, threads=1)
    shape = (32, 32, 3)
    torch.manual_seed(0)
    model = build_model(params.model, in_shape=shape, num_classes=10)
    strategy = parallelize(model, env, parallel=params.parallel, train=params.train,
                           norm=params.model.norm,
                           label_smoothing=params.optim.label_smoothing, in_shape=shape)
    del model
    optimizer = loop.build_optimizer(strategy.parameters(), params.optim, 0.05)
    strategy.finish()
    busy = [0.0]
    pipe = getattr(strategy, "pipe", None)
    if pipe is not None:
        for stage in ([pipe.schedule._stage] if hasattr(pipe.schedule, "_stage")
                      else pipe.schedule._stages):
            _timed(stage, "forward_one_chunk", busy)
            _timed(stage, "backward_one_chunk", busy)
    g = torch.Generator().manual_seed(strategy.data_rank)
    per_rank = args.batch_size // strategy.data_world
    x = torch.randn(per_rank, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (per_rank,), generator=g)
    wall, mem = 0.0, {}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            busy[0] = 0.0
            if env.distributed:
                torch.distributed.barrier()
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        strategy.train_step([(x, y)], step)
        if step == 0:
            optimizer.step()
            mem = state_bytes(strategy.parameters(), optimizer)  # grads still held
        else:
            optimizer.step()
    if env.distributed:
        torch.distributed.barrier()
    wall = time.perf_counter() - start
    row = {"rank": rank, "wall_s": wall, "busy_s": busy[0], "state_bytes": sum(mem.values()),
           "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "bubble": strategy.describe().get("bubble")}
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    shutdown()


def run(label: str, world: int, overrides: dict, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, _free_port(), args, overrides, out),
                           nprocs=world, start_method="spawn", join=True)
        rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    wall = max(r["wall_s"] for r in rows)
    return {"label": label, "samples_s": args.batch_size * args.steps / wall, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch per step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated labels to run")
    args = ap.parse_args()
    results = []
    for label, world, overrides in CONFIGS:
        if args.only and label not in args.only.split(","):
            continue
        start = time.perf_counter()
        results.append(run(label, world, overrides, args))
        print(f"  ran {label} in {time.perf_counter() - start:.1f}s", flush=True)
    base = results[0]
    base_state = base["rows"][0]["state_bytes"]
    print(f"\n{args.model}, global batch {args.batch_size}, {args.steps} timed steps, "
          "gloo, 1 thread per process")
    print(f"{'config':<16} {'samples/s':>9} {'x 1 proc':>8} {'rank':>4} {'peak RSS MiB':>12} "
          f"{'param+grad+opt MiB':>18} {'x 1 proc':>8} {'idle':>6} {'bubble':>6}")
    for res in results:
        for r in res["rows"]:
            idle = f"{1 - r['busy_s'] / r['wall_s']:.3f}" if r["bubble"] is not None else ""
            bubble = f"{r['bubble']:.3f}" if r["bubble"] is not None else ""
            label, rate, ratio = "", "", ""
            if r["rank"] == 0:
                label, rate = res["label"], f"{res['samples_s']:.1f}"
                ratio = f"{res['samples_s'] / base['samples_s']:.2f}"
            print(f"{label:<16} {rate:>9} {ratio:>8} {r['rank']:>4} {r['rss_mib']:>12.0f} "
                  f"{r['state_bytes'] / 2**20:>18.2f} {r['state_bytes'] / base_state:>8.2f} "
                  f"{idle:>6} {bubble:>6}")
    fsdp = next((r for r in results if r["label"] == "fsdp=2"), None)
    if fsdp:
        worst = max(r["state_bytes"] for r in fsdp["rows"]) / base_state
        print(f"\nfsdp=2 parameter+gradient+optimizer memory per rank: {worst:.2f}x one "
              f"process (target <= 0.6x): {'ok' if worst <= 0.6 else 'MISSED'}")
    print("idle = 1 - (stage forward+backward time / wall) per rank, measured; bubble = "
          "(K-1)/(M+K-1), theory")


if __name__ == "__main__":
    main()
