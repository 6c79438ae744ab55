"""Prepare + shard throughput and peak memory against a plain numpy.save of the same arrays.

    .venv/bin/python bench/prepare.py                      # 50k and 200k images, ~1 min
    .venv/bin/python bench/prepare.py --sizes 20000 100000

Measured: `prepare(PrepareConfig(source="synthetic", num_images=N, workers=2))` then
`write_shards(..., workers=2)` on 32x32x3 images, in MB/s of prepared bytes (the
train/val/test images and labels, 10^6 bytes per MB), prepare and shard separately and
together. Baseline, in the same process right after: `numpy.save` of those same arrays
(already in memory, so the baseline does no generation, hashing or tar framing) to the
same disk. Both write the arrays and shards to the page cache without fsync (only the
small JSON files and the directory renames are fsynced).

Memory: each size runs in a fresh child process, so the RSS high-water marks are its own:
ru_maxrss of the process (prepare + shard), ru_maxrss of its children (the largest shard
pool worker) and the peak of process + children RSS summed, sampled every 20 ms with
psutil. All are taken before the baseline loads the arrays. Neither stage imports torch
(the shard tars are written with the standard library), so none of it is torch's.

Targets: (prepare + shard) / numpy.save >= 0.25, and peak memory flat in the number of
images (largest size / smallest <= 1.25 for 4x the images).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from _common import table

RATIO_TARGET = 0.25
FLAT_TARGET = 1.25
SPLITS = ("train", "val", "test")


def _anon_kb(pid: int) -> int:
    """RssAnon of `pid` in KiB: heap and other private memory, not mapped file pages."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRss:
    """Samples this process's memory plus its children's every `interval` seconds: RSS
    (which counts the memory-mapped prepared arrays' pages a shard worker has read, page
    cache that the kernel can drop) and RssAnon (private memory, what must stay flat)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak = self.peak_anon_kb = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total, anon = me.memory_info().rss, _anon_kb(me.pid)
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                    anon += _anon_kb(child.pid)
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.peak_anon_kb = max(self.peak_anon_kb, anon)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(num_images: int, root: Path) -> dict:
    """One size, in this (fresh) process: times, MB and memory high-water marks."""
    from cnnflow.config import PrepareConfig
    from cnnflow.data.prepare import prepare
    from cnnflow.data.shards import write_shards

    prepared, shards = root / "prepared", root / "shards"
    with PeakRss() as sampled:
        start = time.perf_counter()
        prepare(PrepareConfig(source="synthetic", num_images=num_images, workers=2,
                              out_dir=str(prepared)), show_progress=False)
        mid = time.perf_counter()
        rss_prepare = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        write_shards(prepared, shards, samples_per_shard=1000, workers=2, show_progress=False)
        end = time.perf_counter()
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

    arrays = {f"{s}_{k}": np.load(prepared / f"{s}_{k}.npy") for s in SPLITS
              for k in ("images", "labels")}
    nbytes = sum(a.nbytes for a in arrays.values())
    (root / "baseline").mkdir()
    t0 = time.perf_counter()
    for name, array in arrays.items():
        np.save(root / "baseline" / f"{name}.npy", array)
    baseline = time.perf_counter() - t0
    return {"images": num_images, "mb": nbytes / 1e6, "prepare_s": mid - start,
            "shard_s": end - mid, "numpy_s": baseline, "rss_prepare_kb": rss_prepare,
            "rss_self_kb": rss_self, "rss_children_kb": rss_children,
            "rss_sum_peak_kb": sampled.peak // 1024, "anon_sum_peak_kb": sampled.peak_anon_kb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000],
                        help="numbers of images; memory is compared between the extremes")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.root))))
        return

    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--root", tmp],
                capture_output=True, text=True, check=False,
            )
            if out.returncode:
                sys.exit(f"child for {n} images failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    print("throughput, MB/s of prepared arrays (32x32x3 uint8 + int64 labels)")
    header = ["images", "MB", "prepare", "shard", "prepare+shard", "numpy.save", "ratio"]
    rows = []
    for r in results:
        both = r["mb"] / (r["prepare_s"] + r["shard_s"])
        base = r["mb"] / r["numpy_s"]
        rows.append([f"{r['images']:,}", r["mb"], r["mb"] / r["prepare_s"],
                     r["mb"] / r["shard_s"], both, base, f"{both / base:.3f}"])
    table(header, rows)
    print("\nseconds")
    table(["images", "prepare", "shard", "numpy.save"],
           [[f"{r['images']:,}", f"{r['prepare_s']:.2f}", f"{r['shard_s']:.2f}",
             f"{r['numpy_s']:.2f}"] for r in results])
    print("\npeak memory, MB (RSS high-water)")
    table(["images", "prepare", "prepare+shard", "shard worker", "all RSS", "all RssAnon"],
          [[f"{r['images']:,}", r["rss_prepare_kb"] / 1024, r["rss_self_kb"] / 1024,
            r["rss_children_kb"] / 1024, r["rss_sum_peak_kb"] / 1024,
            r["anon_sum_peak_kb"] / 1024] for r in results])
    print("(prepare, prepare+shard: the process's ru_maxrss; shard worker: its children's;"
          " all: process + children summed, sampled every 20 ms)")
    last = results[-1]
    ratio = last["mb"] / (last["prepare_s"] + last["shard_s"]) / (last["mb"] / last["numpy_s"])
    growth = last["anon_sum_peak_kb"] / results[0]["anon_sum_peak_kb"]
    rss_growth = last["rss_sum_peak_kb"] / results[0]["rss_sum_peak_kb"]
    print(f"\nratio at {last['images']:,} images: {ratio:.3f} "
          f"(target >= {RATIO_TARGET}: {'met' if ratio >= RATIO_TARGET else 'BELOW'})")
    size_x = last["images"] / results[0]["images"]
    print(f"peak RssAnon growth for {size_x:g}x the images: {growth:.2f}x "
          f"(target <= {FLAT_TARGET}: {'met' if growth <= FLAT_TARGET else 'NOT flat'}); "
          f"RSS incl. mapped file pages: {rss_growth:.2f}x")



if __name__ == "__main__":
    main()
