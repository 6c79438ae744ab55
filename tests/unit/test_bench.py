"""The benchmarks run and print their rows (behaviour only, never timing): bench/gpu.py on a
machine without a GPU, bench/loader.py and bench/checkpoint.py with tiny sizes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_bench_runs_on_cpu_with_tiny_sizes():
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--steps", "1",
         "--warmup", "1", "--batch", "2", "--no-compile"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "images/s" in done.stdout
    assert re.search(r"^ratio .+: \d+\.\d+$", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^fraction of bf16 peak .+: \d+\.\d+$", done.stdout, re.MULTILINE)


def _bench(*args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_loader_bench_prints_local_and_s3_rows():
    out = _bench("loader.py", "--images", "1200", "--samples-per-shard", "200",
                 "--batch-size", "64", "--epochs", "1")
    assert re.search(r"^shards, 0 workers\s+[\d,]+\s+\d+\.\d+\s+\d+\.\dx$", out, re.MULTILINE), out
    assert re.search(r"^s3 GETs alone\s+[\d,]+   \(\d+ MB/s, 8 in flight", out, re.MULTILINE), out
    for workers in (0, 2):
        assert re.search(rf"^s3, {workers} workers, cold\s+[\d,]+\s+\d+\.\d+\s+\d+\.\dx   "
                         rf"\(vs local disk, {workers} workers; \d+\.\d+ of the GETs\)$",
                         out, re.MULTILINE), out
        assert re.search(rf"^s3, {workers} workers, warm\s+[\d,]+\s+\d+\.\d+\s+\d+\.\dx",
                         out, re.MULTILINE), out


@pytest.mark.slow
def test_checkpoint_bench_prints_the_s3_to_local_ratios():
    out = _bench("checkpoint.py", "--repeats", "1")
    assert re.search(r"^loopback s3\s+\d+\.\d+\s+\d+\.\d+$", out, re.MULTILINE), out
    assert re.search(r"^ratio s3/local save: \d+\.\d+$", out, re.MULTILINE), out
    assert re.search(r"^ratio s3/local load: \d+\.\d+$", out, re.MULTILINE), out
