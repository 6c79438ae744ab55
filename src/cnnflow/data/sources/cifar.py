"""CIFAR-10 python batches, as unpacked from cifar-10-python.tar.gz.

`path` is the `cifar-10-batches-py` directory: data_batch_1..5, test_batch and
batches.meta (`label_names`). All batches form one pool, data_batch_* in numeric order
then test_batch, which the split re-splits: CIFAR's own train/test division is not kept.

Security: the batches are pickles, and a plain unpickler runs code chosen by whoever wrote
the file. They are read with an allow-list of globals (the Python documentation's
"restricting globals"): a batch holds dicts, lists, bytes, ints and numpy arrays, so only
what rebuilds an array is allowed; any other global, which is how a pickle calls code, is
refused with one line naming it, before anything runs.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from cnnflow.config import PrepareConfig
from cnnflow.data.sources.base import SourceData, check_native_shape, chunk_rows, split_params
from cnnflow.errors import DataError

NATIVE_SHAPE = (32, 32, 3)
ROW_BYTES = 3 * 32 * 32
"""A stored row: 1024 red, then 1024 green, then 1024 blue bytes, each 32x32 row-major."""


def open_cifar(cfg: PrepareConfig) -> SourceData:
    check_native_shape(cfg, NATIVE_SHAPE)
    directory = Path(cfg.path)
    classes = _label_names(directory / "batches.meta")
    rows, labels = [], []
    for path in batch_files(directory):
        data, batch_labels = _read_batch(path, len(classes))
        rows.append(data)
        labels.append(batch_labels)
    data = np.concatenate(rows)
    return SourceData(
        classes=classes,
        labels=np.concatenate(labels),
        image_shape=NATIVE_SHAPE,
        read_chunks=lambda: _chunks(data),
        params={"source": "cifar", "path": cfg.path, **split_params(cfg)},
    )


def batch_files(directory: Path) -> list[Path]:
    def number(path: Path) -> int:
        return int(path.name.rsplit("_", 1)[1])

    train = sorted(
        (p for p in directory.iterdir() if re.fullmatch(r"data_batch_\d+", p.name)), key=number
    )
    test = [directory / "test_batch"] if (directory / "test_batch").is_file() else []
    if not train and not test:
        raise DataError(f"{directory}: no CIFAR batches; expected data_batch_1..5 and test_batch")
    return train + test


def _chunks(data: np.ndarray):
    """(n, 3072) planar rows -> (n, 32, 32, 3) interleaved, one chunk at a time."""
    rows = chunk_rows(NATIVE_SHAPE)
    for start in range(0, len(data), rows):
        block = data[start : start + rows].reshape(-1, 3, 32, 32)
        yield np.ascontiguousarray(block.transpose(0, 2, 3, 1))


_ARRAY_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3's protocol 2 spells bytes
})


class _Refused(Exception):
    pass


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _unpickle(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: missing; expected a CIFAR-10 python pickle file")
    try:
        with path.open("rb") as f:
            return _BatchUnpickler(f, encoding="bytes").load()
    except _Refused as exc:
        raise DataError(f"{path}: refused: the pickle calls {exc}, which a CIFAR batch never "
                        "holds (unpickling it would run code)") from None
    except Exception as exc:  # any unpickling failure is a bad file, not a cnnflow bug
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__})") from None


def _label_names(path: Path) -> list[str]:
    meta = _unpickle(path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: expected a dict with a non-empty b'label_names' list")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with b'data' and b'labels'")
    data = batch[b"data"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == ROW_BYTES
    ):
        got = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: b'data' has shape {got}, expected (N, {ROW_BYTES}) uint8")
    labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels, expected {len(data)} (one per image)")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1} (batches.meta classes)")
    return data, labels
