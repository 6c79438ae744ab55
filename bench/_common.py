"""Helpers the benchmarks share: synthetic data sets, params, tables, in-memory splits.

Not a benchmark itself. Scripts import it as `_common` (bench/ is sys.path[0] when a
script under it runs).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cnnflow.config import Params, PrepareConfig, load_params, to_dict
from cnnflow.data.prepare import load_prepared, prepare
from cnnflow.data.shards import write_shards

REPO = Path(__file__).resolve().parents[1]


def quiet() -> None:
    """Keep cnnflow's INFO logs (and progress lines) off the benchmark's table."""
    logging.getLogger("cnnflow").setLevel(logging.WARNING)


def synthetic_shards(root: Path, num_images: int, *, samples_per_shard: int = 256,
                     seed: int = 0) -> tuple[Path, Path]:
    """(prepared dir, shard dir) of `num_images` synthetic 32x32x3 images under `root`."""
    prepared, shards = root / "prepared", root / "shards"
    prepare(PrepareConfig(source="synthetic", num_images=num_images, seed=seed, workers=2,
                          out_dir=str(prepared)), show_progress=False)
    write_shards(prepared, shards, samples_per_shard=samples_per_shard, workers=2,
                 show_progress=False)
    return prepared, shards


def params_for(root: Path, overrides: list[str], *, base: str | Path | None = None) -> Params:
    """Params (built-in defaults, or `base` params.yaml) with every output dir under
    `root`, then `overrides` (section.key=value) applied."""
    dirs = [f"prepare.out_dir={root / 'prepared'}", f"shard.out_dir={root / 'shards'}",
            f"train.shards={root / 'shards'}", f"train.out_dir={root / 'train'}",
            f"checkpoint.dir={root / 'checkpoints'}"]
    return load_params(base, [*dirs, *overrides])


def write_params(params: Params, path: Path) -> Path:
    """params.yaml for `python -m cnnflow.train --params path`."""
    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def in_memory(prepared: Path, split: str) -> tuple[Any, Any]:
    """(uint8 NCHW images, int64 labels) torch tensors of a prepared split, loaded."""
    import torch  # not at module level: bench/prepare.py measures memory without it

    ds = load_prepared(prepared)
    images = torch.from_numpy(np.array(ds.images(split))).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.array(ds.labels(split)))


def normalization(prepared: Path) -> tuple[list[float], list[float]]:
    norm = load_prepared(prepared).meta["normalize"]
    return norm["mean"], norm["std"]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """Run `cmd`, raising with its stderr tail on failure; return its wall seconds."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start


def table(headers: list[str], rows: list[list[Any]]) -> None:
    """A left-aligned first column, right-aligned figures."""
    cells = [[_fmt(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        first = row[0].ljust(widths[0])
        print("  ".join([first, *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def verdict(value: float, target: float) -> str:
    """`0.93 (target >= 0.97: below)`."""
    return f"{value:.3f} (target >= {target:g}: {'met' if value >= target else 'BELOW'})"
