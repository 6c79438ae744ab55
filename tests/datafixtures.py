"""Fabricated prepared data sets, in the layout `cnnflow.data.prepare` writes.

Every image is unique and encodes its split-local index in its first three pixels, so a
test can tell which source sample a loaded image is (`image_index`) without a lookup.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def make_prepared(
    root: str | Path,
    counts: dict[str, int] | None = None,
    *,
    shape: tuple[int, int, int] = (8, 8, 3),
    num_classes: int = 10,
    seed: int = 0,
) -> Path:
    """Write `{split}_images.npy`, `{split}_labels.npy` and dataset.json under `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = counts or {"train": 100, "val": 20, "test": 20}
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    splits = {}
    for split, count in counts.items():
        images = np.lib.format.open_memmap(
            root / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(count, *shape)
        )
        images[:] = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
        flat = images.reshape(count, -1)
        index = np.arange(count)
        flat[:, 0], flat[:, 1], flat[:, 2] = index % 256, (index // 256) % 256, index // 65536
        images.flush()
        labels = (np.arange(count) % num_classes).astype(np.int64)
        np.save(root / f"{split}_labels.npy", labels)
        digest.update(np.asarray(images).tobytes() + labels.tobytes())
        splits[split] = {"count": count}
        del images
    meta = {
        "format": 1,
        "version": digest.hexdigest(),
        "image_shape": list(shape),
        "classes": [f"c{i}" for i in range(num_classes)],
        "splits": splits,
        "normalize": {"mean": [0.5] * shape[2], "std": [0.25] * shape[2]},
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return root


def image_index(image: np.ndarray, *, chw: bool = False) -> int:
    """The split-local index `make_prepared` wrote into an HWC (or CHW) image."""
    flat = np.asarray(image.transpose(1, 2, 0) if chw else image).reshape(-1)
    return int(flat[0]) + 256 * int(flat[1]) + 65536 * int(flat[2])
