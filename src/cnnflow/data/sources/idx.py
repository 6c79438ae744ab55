"""MNIST-format IDX files: `<prefix>-images-idx3-ubyte[.gz]` + `<prefix>-labels-idx1-ubyte[.gz]`.

All pairs in the directory are concatenated in sorted prefix order (MNIST: t10k, then
train); the split re-splits that pool. Classes are the distinct label values present,
sorted numerically, as strings ("0".."9" for MNIST); labels are stored as positions in
that list. The header is parsed here: magic 0x00000803 (ubyte, 3 dims) for images,
0x00000801 (ubyte, 1 dim) for labels, then one big-endian uint32 per dimension.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import numpy as np

from cnnflow.config import PrepareConfig
from cnnflow.data.sources.base import SourceData, array_chunks, check_native_shape, split_params
from cnnflow.errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_NAME = re.compile(r"^(?P<prefix>.+?)-(?P<kind>images|labels)[-.]idx(?P<dims>[13])-ubyte(\.gz)?$")


def open_idx(cfg: PrepareConfig) -> SourceData:
    pairs = find_pairs(Path(cfg.path))
    images, labels = [], []
    for image_file, label_file in pairs:
        pixels = read_idx(image_file, IMAGES_MAGIC, 3)
        values = read_idx(label_file, LABELS_MAGIC, 1)
        if len(values) != len(pixels):
            raise DataError(
                f"{label_file}: holds {len(values)} labels, expected {len(pixels)} "
                f"(the image count of {image_file.name})"
            )
        if images and pixels.shape[1:] != images[0].shape[1:]:
            raise DataError(
                f"{image_file}: images are {pixels.shape[1]}x{pixels.shape[2]}, expected "
                f"{images[0].shape[1]}x{images[0].shape[2]} like {pairs[0][0].name}"
            )
        images.append(pixels)
        labels.append(values)
    pixels = np.concatenate(images)[..., None]
    shape = pixels.shape[1:]
    check_native_shape(cfg, shape)
    present, positions = np.unique(np.concatenate(labels), return_inverse=True)
    return SourceData(
        classes=[str(int(v)) for v in present],
        labels=positions.reshape(-1).astype(np.int64),
        image_shape=shape,
        read_chunks=lambda: array_chunks(pixels),
        params={"source": "idx", "path": cfg.path, **split_params(cfg)},
    )


def find_pairs(directory: Path) -> list[tuple[Path, Path]]:
    """(images, labels) file pairs matched by prefix, sorted by prefix."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(directory.iterdir()):
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.setdefault(match["prefix"], {})[match["kind"]] = path
    if not found:
        raise DataError(
            f"{directory}: no IDX files; expected <prefix>-images-idx3-ubyte[.gz] and "
            "<prefix>-labels-idx1-ubyte[.gz]"
        )
    pairs = []
    for prefix in sorted(found):
        kinds = found[prefix]
        for have, need in (("images", "labels"), ("labels", "images")):
            if need not in kinds:
                dims = 1 if need == "labels" else 3
                raise DataError(
                    f"{kinds[have]}: no matching {prefix}-{need}-idx{dims}-ubyte[.gz] beside it"
                )
        pairs.append((kinds["images"], kinds["labels"]))
    return pairs


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """The uint8 array of one IDX file, validated against its header."""
    raw = _read_bytes(path)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header_len})")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: IDX magic number 0x{found:08X}, expected 0x{magic:08X}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) - header_len != size:
        raise DataError(
            f"{path}: {len(raw) - header_len} data bytes, expected {size} for shape {dims}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not a gzip file (expected gzip data for a .gz name)") from None
    except (EOFError, zlib.error):
        raise DataError(f"{path}: truncated or corrupt gzip data") from None
