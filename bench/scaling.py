"""DDP scaling efficiency: 2 processes x 1 thread against 1 process x 1 thread.

    .venv/bin/python bench/scaling.py                      # ResNet-20, ~2 min
    .venv/bin/python bench/scaling.py --train-images 8192 --batch-size 64

Measured: cnnflow training (ResNet-20, synthetic 32x32x3 shards in a temp dir,
train.threads=1, augment off, 2 epochs) launched as
`python -m torch.distributed.run --standalone --nproc_per_node=2 -m cnnflow.train --params F`
against `python -m cnnflow.train --params F` in one process, with the same batch per
process (`--batch-size`, so the global batch doubles). Figures come from the last epoch's
row of metrics.jsonl (steady state: the first epoch holds the warm-up steps): its
samples_per_s (global samples / rank 0's epoch wall time, validation excluded) and its
data_s, compute_s and comm_s. Scaling efficiency = samples/s(2) / (2 x samples/s(1)).

Where the rest goes: the per-step time of 2 processes minus that of 1, split into data
(loading + normalising), compute (forward, backward, optimizer step, including the time
backward waits for the gradient all-reduce) and other (logging, progress file, the rest
of the loop). comm_s is the all-reduce time measured by the DDP hook; it overlaps
backward, so it is shown beside the split, not in it.

Second baseline: a bare DDP loop (this file with --bare-worker, under the same launcher)
on in-memory random tensors: same model, batch, DDP bucket (25 MiB) and gloo, no loader,
no schedule, no logging. Its own efficiency shows what 2 processes on this machine allow;
the difference between the two efficiencies is the part attributable to cnnflow.

Each of the four runs is repeated in `--rounds` interleaved rounds and its best
samples/s counts: noise only ever slows a run down.

Target: cnnflow's efficiency >= 0.95. With 2 cores and noisy neighbours, 2 processes
compete with everything else on the machine: the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    params_for,
    quiet,
    read_jsonl,
    run,
    synthetic_shards,
    table,
    verdict,
    write_params,
)

TARGET = 0.95
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2"]


def bare_worker(batch: int, warmup: int, steps: int, out: Path) -> None:
    """The bare loop, in one process or as one rank under torchrun."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cnnflow.config import ModelConfig
    from cnnflow.models import build_model

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet20", dropout=0.0), in_shape=(32, 32, 3),
                        num_classes=10)
    if world > 1:
        dist.init_process_group("gloo")
        model = DDP(model, bucket_cap_mb=25, gradient_as_bucket_view=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    gen = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (8 * batch, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (8 * batch,), generator=gen)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
        part = slice((step % 8) * batch, (step % 8 + 1) * batch)
        x = images[part].float().div_(255).sub_(0.5).div_(0.25)
        loss = F.cross_entropy(model(x), labels[part])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if world > 1:
        dist.barrier()
    wall = time.perf_counter() - start
    if rank == 0:
        out.write_text(json.dumps({"samples_per_s": steps * batch * world / wall,
                                   "step_time_s": wall / steps}))
    if world > 1:
        dist.destroy_process_group()


def bare(root: Path, nproc: int, args, rnd: int = 0) -> dict:
    out = root / f"bare{nproc}-{rnd}.json"
    cmd = [__file__, "--bare-worker", "--batch-size", str(args.batch_size), "--warmup",
           str(args.warmup), "--steps", str(args.steps), "--out", str(out)]
    run((TORCHRUN if nproc > 1 else [sys.executable]) + cmd, cwd=root)
    return json.loads(out.read_text())


def cnnflow(root: Path, nproc: int, args, rnd: int = 0) -> dict:
    name = f"cnnflow{nproc}-{rnd}"
    params = params_for(root, [
        "model.name=resnet20", "model.dropout=0", "optim.label_smoothing=0",
        f"train.batch_size={args.batch_size * nproc}", "train.epochs=2",
        "train.threads=1", "train.augment=false", "train.loader_workers=0",
        f"train.out_dir={root / name}", f"checkpoint.dir={root / name / 'checkpoints'}",
    ])
    path = write_params(params, root / f"{name}.yaml")
    launcher = TORCHRUN if nproc > 1 else [sys.executable]
    env = {**os.environ, "CNNFLOW_LOG_LEVEL": "WARNING"}
    run(launcher + ["-m", "cnnflow.train", "--params", str(path)], cwd=root, env=env)
    rows = read_jsonl(root / name / "metrics.jsonl")
    last = rows[-1]
    steps = last["step"] - (rows[-2]["step"] if len(rows) > 1 else 0)
    per = {k: last[k] / steps for k in ("data_s", "compute_s", "comm_s")}
    return {"samples_per_s": last["samples_per_s"], "step_time_s": last["step_time_s"],
            "steps": steps, **per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--train-images", type=int, default=3072,
                        help="training images (per epoch: 1 process takes all of them in "
                             "steps of --batch-size, 2 processes half each)")
    parser.add_argument("--steps", type=int, default=20, help="bare loop: timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="bare loop: untimed steps")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of the four runs; each run's best counts")
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        bare_worker(args.batch_size, args.warmup, args.steps, Path(args.out))
        return
    quiet()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_shards(root, int(args.train_images / 0.8) + 50)
        rounds = [(cnnflow(root, 1, args, r), cnnflow(root, 2, args, r),
                   bare(root, 1, args, r), bare(root, 2, args, r))
                  for r in range(args.rounds)]  # interleaved

    def best(i: int) -> dict:
        return max((r[i] for r in rounds), key=lambda x: x["samples_per_s"])

    c1, c2, b1, b2 = best(0), best(1), best(2), best(3)

    eff_c = c2["samples_per_s"] / (2 * c1["samples_per_s"])
    eff_b = b2["samples_per_s"] / (2 * b1["samples_per_s"])
    print(f"ResNet-20, batch {args.batch_size} per process, 1 thread per process, gloo; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    def ms(x: float) -> str:
        return f"{x * 1000:.0f}"

    rows = []
    for label, r in (("cnnflow 1 x 1", c1), ("cnnflow 2 x 1", c2)):
        other = r["step_time_s"] - r["data_s"] - r["compute_s"]
        rows.append([label, r["samples_per_s"], ms(r["step_time_s"]), ms(r["data_s"]),
                     ms(r["compute_s"]), ms(other), ms(r["comm_s"])])
    for label, r in (("bare DDP 1 x 1", b1), ("bare DDP 2 x 1", b2)):
        rows.append([label, r["samples_per_s"], ms(r["step_time_s"]), "", "", "", ""])
    table(["run", "samples/s", "step ms", "data ms", "compute ms", "other ms",
           "comm ms (overlapped)"], rows)

    lost = c2["step_time_s"] - c1["step_time_s"]
    d_other = (c2["step_time_s"] - c2["data_s"] - c2["compute_s"]) - (
        c1["step_time_s"] - c1["data_s"] - c1["compute_s"])
    print(f"\n2 processes add {lost * 1000:.0f} ms per step to cnnflow: data "
          f"{(c2['data_s'] - c1['data_s']) * 1000:+.0f} ms, compute incl. all-reduce wait "
          f"{(c2['compute_s'] - c1['compute_s']) * 1000:+.0f} ms, other {d_other * 1000:+.0f} ms"
          f" (all-reduce itself {c2['comm_s'] * 1000:.0f} ms, overlapped with backward)")
    print("rounds, samples/s (cnnflow 1, 2; bare 1, 2): " + "; ".join(
        ", ".join(f"{x['samples_per_s']:.0f}" for x in r) for r in rounds))
    print(f"bare DDP efficiency: {eff_b:.3f}; gap attributable to cnnflow: {eff_b - eff_c:+.3f}")
    print(f"cnnflow scaling efficiency 2 x 1 vs 1 x 1: {verdict(eff_c, TARGET)}")


if __name__ == "__main__":
    main()
