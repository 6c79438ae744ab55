"""bench/gpu.py keeps working on a machine without a GPU (behaviour only, never timing)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
