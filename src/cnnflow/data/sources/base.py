"""What every source hands to `prepare`, and the checks sources share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnflow.config import PrepareConfig
from cnnflow.errors import ConfigError

# 16 MiB of pixels per chunk: large enough that per-chunk overhead (pickling, hashing
# calls, file writes) is noise, small enough that a few chunks in flight stay cheap.
CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(kw_only=True)
class SourceData:
    """A data set ready to be split: labels now, pixels streamed in original order."""

    classes: list[str]
    """Class names; `labels` index into this list."""
    labels: np.ndarray
    """int64 (N,), one per image, in the order `read_chunks` yields images."""
    image_shape: tuple[int, int, int]
    """(H, W, C) of every image."""
    read_chunks: Callable[[], Iterator[np.ndarray]]
    """Yields uint8 (n, H, W, C) C-contiguous chunks covering all N images in order."""
    params: dict[str, Any]
    """The config fields that determine the content (recorded in dataset.json)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Source-specific entries for dataset.json (imagefolder: `skipped`)."""


def chunk_rows(image_shape: tuple[int, int, int]) -> int:
    """Images per chunk for this shape: a pure function of the shape, never of workers."""
    height, width, channels = image_shape
    return max(1, CHUNK_BYTES // (height * width * channels))


def array_chunks(images: np.ndarray, rows: int | None = None) -> Iterator[np.ndarray]:
    """Yield contiguous row blocks of an (N, H, W, C) uint8 array (or array view)."""
    rows = rows or chunk_rows(images.shape[1:])
    for start in range(0, len(images), rows):
        yield np.ascontiguousarray(images[start : start + rows], dtype=np.uint8)


def check_native_shape(cfg: PrepareConfig, native: tuple[int, int, int]) -> None:
    """digits/idx/cifar keep their pixels as stored: height/width/channels must be 0 or native."""
    requested = (cfg.height, cfg.width, cfg.channels)
    for key, value, want in zip(("height", "width", "channels"), requested, native, strict=True):
        if value not in (0, want):
            raise ConfigError(
                f"prepare.{key}: source {cfg.source!r} keeps its native size; "
                f"expected 0 or {want}, got {value}"
            )


def resolved_shape(cfg: PrepareConfig) -> tuple[int, int, int]:
    """Requested (H, W, C) with 0 replaced by the defaults 32, 32, 3."""
    return cfg.height or 32, cfg.width or 32, cfg.channels or 3


def split_params(cfg: PrepareConfig) -> dict[str, Any]:
    """The fields every source's content depends on: the split seed and ratios."""
    return {
        "seed": cfg.seed,
        "train_ratio": cfg.train_ratio,
        "val_ratio": cfg.val_ratio,
        "test_ratio": cfg.test_ratio,
    }
