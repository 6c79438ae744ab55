"""Materialise the embedded digits as raw IDX files under data/raw/ (`cnnflow raw`).

The default source ships inside scikit-learn. Writing it out once as MNIST-format IDX
files gives the pipeline an immutable, versioned raw input (data/raw/digits, tracked in
git: 30 KB) that `prepare` reads with `prepare.source=digits, prepare.path=data/raw/digits`
and that DVC lists as a dependency. Pixels are the 0..255 values `prepare` would compute,
so both paths give the same dataset version.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from cnnflow.data.sources.digits import NATIVE_SHAPE, to_uint8
from cnnflow.data.sources.idx import IMAGES_MAGIC, LABELS_MAGIC


def _write_idx_gz(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    tmp = path.with_name(f".{path.name}.tmp")
    # mtime=0 and no file name in the gzip header: the same bytes on every machine
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                               mtime=0, compresslevel=9) as gz:
        gz.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def export_digits(out_dir: str | Path) -> list[Path]:
    """Write digits-images-idx3-ubyte.gz and digits-labels-idx1-ubyte.gz to `out_dir`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = to_uint8(bunch.images).reshape(-1, *NATIVE_SHAPE[:2])
    labels = np.asarray(bunch.target, dtype=np.uint8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "digits-images-idx3-ubyte.gz", out / "digits-labels-idx1-ubyte.gz"]
    _write_idx_gz(paths[0], IMAGES_MAGIC, images)
    _write_idx_gz(paths[1], LABELS_MAGIC, labels)
    return paths
