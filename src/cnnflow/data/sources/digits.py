"""scikit-learn's handwritten digits: 1,797 images of 8x8x1, shipped inside the package."""

from __future__ import annotations

import numpy as np

from cnnflow.config import PrepareConfig
from cnnflow.data.sources.base import SourceData, array_chunks, check_native_shape, split_params
from cnnflow.errors import DataError

NATIVE_SHAPE = (8, 8, 1)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale the 0..16 intensities to 0..255 with integer arithmetic: round(v*255/16),
    halves rounded up (v=8 -> 128), so the result never depends on float rounding."""
    v = np.asarray(values).astype(np.int64)
    return ((v * 255 + 8) // 16).astype(np.uint8)


def open_digits(cfg: PrepareConfig) -> SourceData:
    """The package's copy, or with `prepare.path` the raw IDX copy `cnnflow raw` wrote
    (data/raw/digits): the same pixels and labels, so the same dataset version."""
    check_native_shape(cfg, NATIVE_SHAPE)
    if cfg.path:
        from cnnflow.data.sources.idx import open_idx

        data = open_idx(cfg)
        if data.image_shape != NATIVE_SHAPE:
            raise DataError(
                f"{cfg.path}: digits images are {data.image_shape}, expected {NATIVE_SHAPE}"
            )
        data.params["source"] = "digits"
        return data
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = to_uint8(bunch.images).reshape(-1, *NATIVE_SHAPE)
    return SourceData(
        classes=[str(name) for name in bunch.target_names],
        labels=np.asarray(bunch.target, dtype=np.int64),
        image_shape=NATIVE_SHAPE,
        read_chunks=lambda: array_chunks(images),
        params={"source": "digits", **split_params(cfg)},
    )
