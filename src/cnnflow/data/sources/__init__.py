"""Data sources: each turns a `PrepareConfig` into a `SourceData` that `prepare` splits.

    data = open_source(cfg, scratch=Path("out.tmp-1234/.scratch"))
    data.labels          # int64 (N,), index into data.classes
    for chunk in data.read_chunks():   # uint8 (n, H, W, C), original order, all N rows
        ...

`prepare.path` may be an object storage prefix (`s3://bucket/raw/`, see
`cnnflow.storage`): its objects are copied to a local cache first, and the data set's
params record the URI.

A source knows its labels up front (the split needs them before any image is written)
and yields images in bounded chunks, so a million-image set never sits in memory whole.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cnnflow import storage
from cnnflow.config import PrepareConfig
from cnnflow.data.sources.base import SourceData, check_native_shape
from cnnflow.errors import DataError

__all__ = ["SourceData", "check_native_shape", "open_source"]


def open_source(
    cfg: PrepareConfig, scratch: Path, *, show_progress: bool | None = None
) -> SourceData:
    """Read (or plan the generation of) `cfg.source`.

    `scratch` is an empty directory inside prepare's temporary output directory; sources
    that must decode everything before the split is known (imagefolder) park their pixels
    there, so they are removed with the temporary directory on success or failure.
    """
    from cnnflow.data.sources import cifar, digits, idx, imagefolder, synthetic

    given = cfg.path
    if storage.is_remote(given):  # an object storage prefix: read from a local copy
        cfg = replace(cfg, path=str(storage.download_dir(
            given, storage.staging_dir(given, "source"), "source data set", marker=False)))
    openers = {
        "digits": lambda: digits.open_digits(cfg),
        "synthetic": lambda: synthetic.open_synthetic(cfg),
        "imagefolder": lambda: imagefolder.open_imagefolder(cfg, scratch, show_progress),
        "idx": lambda: idx.open_idx(cfg),
        "cifar": lambda: cifar.open_cifar(cfg),
    }
    if cfg.source not in openers:
        raise DataError(f"prepare.source: expected one of {', '.join(openers)}, got {cfg.source!r}")
    needs_dir = cfg.source in ("imagefolder", "idx", "cifar") or (cfg.source == "digits"
                                                                 and cfg.path)
    if needs_dir and not Path(cfg.path).is_dir():
        raise DataError(f"{cfg.path}: prepare.path for source {cfg.source!r} is not a directory")
    data = openers[cfg.source]()
    if "path" in data.params:
        data.params["path"] = given  # the data set's name, not where it was copied to
    return data
