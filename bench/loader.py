"""Shard loader throughput against batches sliced from a preloaded tensor.

    .venv/bin/python bench/loader.py                  # 20,000 32x32x3 images, < 1 min
    .venv/bin/python bench/loader.py --images 50000 --batch-size 256

Prints samples/s for num_workers 0, 1 and 2 and each one's ratio to the in-memory
baseline, plus the margin over ~300 samples/s: what one ResNet-20 training step on one
CPU core consumes. The loader must stay >= 5x ahead of that so it never starves training.

Then the same shards uploaded to a loopback S3 server (bench/_s3.py, moto in its own
process) and read with 0 and 2 workers: one epoch from a cold cache (the fetches timed),
then epochs from the warm cache, each with its ratio to the local-disk row of the same
worker count (target >= 0.5) and to training (>= 5x). The row "s3 GETs alone" is the
same bytes fetched and discarded at the loader's concurrency: no cold epoch can beat it,
and each cold row says what fraction of it the loader reaches.
`--no-s3` skips those rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cnnflow.data.loader import build_loader
from cnnflow.data.shards import write_shards

TRAINING_RATE = 300.0  # samples/s a ResNet-20 step eats on one core


def fabricate(root: Path, images: int, side: int) -> Path:
    """A prepared directory (train split only) of random uint8 images."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(images, side, side, 3), dtype=np.uint8)
    np.save(root / "train_images.npy", pixels)
    np.save(root / "train_labels.npy", rng.integers(0, 10, size=images, dtype=np.int64))
    meta = {
        "format": 1,
        "version": "0" * 64,
        "image_shape": [side, side, 3],
        "classes": [str(i) for i in range(10)],
        "splits": {"train": {"count": images}},
        "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def rate(batches, epochs: int, *, cold: bool = False) -> float:
    """Samples/s over `epochs` passes; the first batch is not timed (worker start-up),
    unless `cold`: then everything is, from the first epoch's start (remote fetches)."""
    seen, start = 0, time.perf_counter() if cold else None
    for _ in range(epochs):
        for images, _labels in batches():
            if start is None:
                start = time.perf_counter()
                continue
            seen += len(images)
    return seen / (time.perf_counter() - start)


def epochs_of(loader):
    """A callable giving the loader set to its next epoch on each call (for `rate`)."""
    def epochs():
        loader.set_epoch(epochs.count)
        epochs.count += 1
        return loader

    epochs.count = 0
    return epochs


def get_rate(uri: str, images: int) -> float:
    """Samples/s of plain concurrent GETs of every train shard (FETCH_THREADS in flight,
    bytes discarded): what the server alone allows a cold epoch, with no decoding."""
    from concurrent.futures import ThreadPoolExecutor

    from cnnflow import storage
    from cnnflow.data.manifest import load_manifest
    from cnnflow.data.remote import FETCH_THREADS

    names = [e["name"] for e in load_manifest(uri)["splits"]["train"]["shards"]]
    start = time.perf_counter()
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        total = sum(pool.map(lambda n: len(storage.read_bytes(storage.join(uri, n))), names))
    seconds = time.perf_counter() - start
    print(f"{'s3 GETs alone':<22}{images / seconds:>12,.0f}"
          f"   ({total / seconds / 1e6:.0f} MB/s, {FETCH_THREADS} in flight: the cold ceiling)")
    return images / seconds


def s3_rows(args, prepared: Path, tmp: Path, local: dict[int, float]) -> None:
    """The S3 rows: upload the shards, then per worker count one cold epoch (the fetches
    timed) and `epochs` warm ones, against local disk and against the GETs alone."""
    from _s3 import s3_server

    with s3_server() as bucket:
        uri = f"s3://{bucket}/shards"
        start = time.perf_counter()
        write_shards(prepared, uri, samples_per_shard=args.samples_per_shard, workers=2,
                     show_progress=False)
        print(f"uploaded shards to loopback S3 in {time.perf_counter() - start:.2f} s")
        ceiling = get_rate(uri, args.images)
        for workers in (0, 2):
            os.environ["CNNFLOW_STORAGE_CACHE_DIR"] = str(tmp / f"cache-{workers}")
            loader = build_loader(uri, "train", batch_size=args.batch_size,
                                  num_workers=workers)
            epochs = epochs_of(loader)
            cold = rate(epochs, 1, cold=True)
            warm = rate(epochs, args.epochs)
            print(f"{f's3, {workers} workers, cold':<22}{cold:>12,.0f}"
                  f"{cold / local[workers]:>11.2f}{cold / TRAINING_RATE:>12.1f}x"
                  f"   (vs local disk, {workers} workers; {cold / ceiling:.2f} of the GETs)")
            print(f"{f's3, {workers} workers, warm':<22}{warm:>12,.0f}"
                  f"{warm / local[workers]:>11.2f}{warm / TRAINING_RATE:>12.1f}x"
                  f"   (vs local disk, {workers} workers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--side", type=int, default=32, help="image height = width, pixels")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-s3", action="store_true", help="skip the loopback S3 rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = fabricate(Path(tmp) / "prepared", args.images, args.side)
        start = time.perf_counter()
        write_shards(
            prepared,
            Path(tmp) / "shards",
            samples_per_shard=args.samples_per_shard,
            workers=2,
            show_progress=False,
        )
        print(f"wrote shards of {args.images} images in {time.perf_counter() - start:.2f} s")

        memory = torch.from_numpy(np.load(prepared / "train_images.npy")).permute(0, 3, 1, 2)
        memory = memory.contiguous()
        labels = torch.from_numpy(np.load(prepared / "train_labels.npy"))

        def from_memory():
            perm = torch.randperm(len(memory))
            for i in range(0, len(memory) - args.batch_size + 1, args.batch_size):
                idx = perm[i : i + args.batch_size]
                yield memory[idx], labels[idx]

        baseline = rate(from_memory, args.epochs)
        print(f"{'loader':<22}{'samples/s':>12}{'vs memory':>11}{'vs training':>13}")
        print(
            f"{'in-memory tensor':<22}{baseline:>12,.0f}{1.0:>11.2f}"
            f"{baseline / TRAINING_RATE:>12.1f}x"
        )
        local = {}
        for workers in (0, 1, 2):
            loader = build_loader(
                Path(tmp) / "shards", "train", batch_size=args.batch_size, num_workers=workers
            )
            got = local[workers] = rate(epochs_of(loader), args.epochs)
            print(
                f"{f'shards, {workers} workers':<22}{got:>12,.0f}{got / baseline:>11.2f}"
                f"{got / TRAINING_RATE:>12.1f}x"
            )
        if not args.no_s3:
            s3_rows(args, prepared, Path(tmp), local)


if __name__ == "__main__":
    main()
