"""ResNet-56 checkpoint save and load: a loopback S3 server against local disk.

    .venv/bin/python bench/checkpoint.py               # ResNet-56 on CIFAR shapes, ~1 min
    .venv/bin/python bench/checkpoint.py --repeats 5

Times `Checkpointer.save` (torch.save into one PUT, then the `.done` marker; pruning to
`checkpoint.keep`) and `Checkpointer.load` of the newest checkpoint, with the payload a
training run writes (weights, SGD momentum, metadata), into `checkpoint.dir` on local
disk (temp file, fsync, rename) and `s3://bench/ckpt` on moto's S3 emulator
(bench/_s3.py). Prints each median and the S3/local ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cnnflow.config import ModelConfig
from cnnflow.models import build_model
from cnnflow.train.checkpoint import Checkpointer


def payload() -> dict:
    """What a ResNet-56 run checkpoints: weights, SGD momentum buffers, a little meta."""
    model = build_model(ModelConfig(name="resnet56"), in_shape=(32, 32, 3), num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "state": {"step": 1, "epoch": 0, "batch_in_epoch": 1, "history": []}}


def timed(store: Checkpointer, state: dict, repeats: int) -> tuple[float, float]:
    """(median save s, median load s) over `repeats` steps."""
    saves, loads = [], []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        store.save(step, state)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        store.load(store.latest())
        loads.append(time.perf_counter() - start)
    return statistics.median(saves), statistics.median(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from _s3 import s3_server

    state = payload()
    size = sum(t.numel() * t.element_size() for t in state["model"].values())
    print(f"ResNet-56 weights {size / 2**20:.2f} MiB (+ momentum), {args.repeats} repeats")
    with tempfile.TemporaryDirectory() as tmp:
        local = timed(Checkpointer(Path(tmp) / "ckpt", keep=2), state, args.repeats)
        with s3_server() as bucket:
            remote = timed(Checkpointer(f"s3://{bucket}/ckpt", keep=2), state, args.repeats)
    print(f"{'checkpoint':<22}{'save s':>9}{'load s':>9}")
    print(f"{'local disk':<22}{local[0]:>9.3f}{local[1]:>9.3f}")
    print(f"{'loopback s3':<22}{remote[0]:>9.3f}{remote[1]:>9.3f}")
    print(f"ratio s3/local save: {remote[0] / local[0]:.2f}")
    print(f"ratio s3/local load: {remote[1] / local[1]:.2f}")


if __name__ == "__main__":
    main()
