"""prepare: read a source, split it, write uint8 arrays, stats and dataset.json.

    meta = prepare(PrepareConfig(source="digits", out_dir="data/prepared"))
    ds = load_prepared("data/prepared")
    ds.images("train")  # read-only memmap, uint8 (N, H, W, C)

Output (`out_dir`, replaced atomically): `{split}_images.npy` uint8 (N, H, W, C) and
`{split}_labels.npy` int64 (N,) for split in train, val, test; `dataset.json`; the
owner marker of `cnnflow.outputs` (the stage checks `out_dir` with `claim_output` first).
`out_dir` is local, also when shards go to object storage: `cnnflow shard` memory-maps
these arrays, so this directory is the local cache the shards are cut and uploaded from
(`prepare.path`, the source, may be an `s3://` prefix).

Split: per class, that class's indices (ascending) are permuted by a generator seeded
with SeedSequence((seed, 3, class index)); the first round_half_up(n * train_ratio) go
to train, up to round_half_up(n * (train_ratio + val_ratio)) to val, the rest to test,
where round_half_up(x) = floor(x + 0.5). Within a split images keep ascending original
order, so every split file is written front to back.

Normalisation: per-channel mean and std of the train split in [0, 1] units (pixel/255),
population std, from exact integer sums, so they are bit-identical on any machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnflow import storage
from cnnflow.config import PrepareConfig
from cnnflow.data.sources import SourceData, open_source
from cnnflow.errors import ConfigError, DataError
from cnnflow.fileio import atomic_dir, write_json
from cnnflow.outputs import SPOOL, mark_output
from cnnflow.progress import progress

log = logging.getLogger("cnnflow")

FORMAT = 1
SPLITS = ("train", "val", "test")
SPLIT_STREAM = 3
"""Tag in the split generators' seed, so they never share a stream with a source's."""
STATS_ROWS = 16384
"""Images per integer-sum block: 16384 * 255**2 < 2**32, so uint32 partial sums are exact."""


def prepare(cfg: PrepareConfig, *, show_progress: bool | None = None) -> dict[str, Any]:
    """Write the prepared data set to `cfg.out_dir` and return its dataset.json content.

    Everything is written to a hidden sibling `.<out_dir>.tmp-<pid>-<random>` first and
    renamed into place at the end; on any error the temporary directory is removed and an
    existing `out_dir` is left as it was.
    """
    if cfg.seed < 0:
        raise ConfigError(f"prepare.seed: expected an int >= 0, got {cfg.seed}")
    if storage.is_remote(cfg.out_dir):
        raise ConfigError(f"prepare.out_dir: expected a local directory (the cache that "
                          f"`cnnflow shard` cuts and uploads shards from), got {cfg.out_dir!r}; "
                          "put shard.out_dir in object storage instead", key="prepare.out_dir")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: prepare.out_dir exists and is not a directory")
    with atomic_dir(out, keep=(SPOOL,)) as tmp:
        mark_output("prepare", tmp)
        meta = _write_dataset(cfg, tmp, show_progress)
    counts = ", ".join(f"{s} {meta['splits'][s]['count']}" for s in SPLITS)
    log.info("prepared %s (%s) -> %s, version %s", cfg.source, counts, out, meta["version"][:12])
    return meta


def split_assignment(labels: np.ndarray, classes: list[str], cfg: PrepareConfig) -> np.ndarray:
    """int8 (N,): 0 train, 1 val, 2 test for every image (rule in the module docstring)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=len(classes)))])
    assign = np.empty(len(labels), dtype=np.int8)
    for k, name in enumerate(classes):
        members = order[bounds[k] : bounds[k + 1]]
        n = len(members)
        cut_train = _round_half_up(n * cfg.train_ratio)
        cut_val = min(n, _round_half_up(n * (cfg.train_ratio + cfg.val_ratio)))
        for split, size in zip(SPLITS, (cut_train, cut_val - cut_train, n - cut_val), strict=True):
            if size == 0:
                raise DataError(
                    f"class {name!r}: its {n} image(s) leave split {split!r} empty at "
                    f"prepare.train/val/test_ratio {cfg.train_ratio}/{cfg.val_ratio}/"
                    f"{cfg.test_ratio}; expected >= 1 image per class in every split"
                )
        perm = np.random.default_rng([cfg.seed, SPLIT_STREAM, k]).permutation(n)
        assign[members[perm[:cut_train]]] = 0
        assign[members[perm[cut_train:cut_val]]] = 1
        assign[members[perm[cut_val:]]] = 2
    return assign


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


# ------------------------------------------------------------------------- writing


class _SplitWriter:
    """Appends rows to `{split}_images.npy` (header first: the count is known) and
    hashes exactly the bytes written."""

    def __init__(self, path: Path, count: int, shape: tuple[int, int, int]) -> None:
        self.file = path.open("wb")
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, *shape)}
        np.lib.format.write_array_header_1_0(self.file, header)
        self.sha = hashlib.sha256()
        self.remaining = count

    def write(self, rows: np.ndarray) -> None:
        self.file.write(rows.data)
        self.sha.update(rows.data)
        self.remaining -= len(rows)

    def close(self) -> str:
        self.file.close()
        if self.remaining != 0:  # a source yielding the wrong row count is a cnnflow bug
            raise RuntimeError(f"{self.file.name}: {self.remaining} rows short")
        return self.sha.hexdigest()


class _ChannelSums:
    """Exact per-channel sum and sum of squares of uint8 pixels (uint64 accumulators)."""

    def __init__(self, channels: int) -> None:
        self.sum = np.zeros(channels, dtype=np.uint64)
        self.squares = np.zeros(channels, dtype=np.uint64)
        self.pixels = 0

    def add(self, images: np.ndarray) -> None:
        channels = images.shape[-1]
        for start in range(0, len(images), STATS_ROWS):
            flat = images[start : start + STATS_ROWS].reshape(-1, images[0].size)
            # sum over images first (long contiguous rows vectorise well), then fold pixels
            total = flat.sum(axis=0, dtype=np.uint32)
            squares = np.square(flat, dtype=np.uint16).sum(axis=0, dtype=np.uint32)
            self.sum += total.reshape(-1, channels).sum(axis=0, dtype=np.uint64)
            self.squares += squares.reshape(-1, channels).sum(axis=0, dtype=np.uint64)
        self.pixels += images.size // channels

    def normalize(self) -> dict[str, list[float]]:
        """Mean and population std in [0, 1] units; Python int arithmetic, then one
        correctly rounded division and sqrt, so the floats are the same everywhere."""
        p = self.pixels
        mean, std = [], []
        for s, q in zip(self.sum.tolist(), self.squares.tolist(), strict=True):
            mean.append(s / (p * 255))
            std.append(math.sqrt((p * q - s * s) / (p * p * 255 * 255)))
        return {"mean": mean, "std": std}


def _write_dataset(cfg: PrepareConfig, tmp: Path, show_progress: bool | None) -> dict[str, Any]:
    scratch = tmp / ".scratch"
    scratch.mkdir()
    data = open_source(cfg, scratch, show_progress=show_progress)
    assign = split_assignment(data.labels, data.classes, cfg)
    labels = {split: data.labels[assign == s] for s, split in enumerate(SPLITS)}
    digests = _write_images(data, assign, tmp, show_progress)
    for split in SPLITS:
        np.save(tmp / f"{split}_labels.npy", labels[split].astype("<i8"))
    shutil.rmtree(scratch)
    image_digests = {split: digests[split][0] for split in SPLITS}
    meta = {
        "format": FORMAT,
        "version": _version(data.image_shape, labels, image_digests, data.classes),
        "source": cfg.source,
        "params": data.params,
        "image_shape": list(data.image_shape),
        "classes": data.classes,
        "splits": {
            split: {
                "count": len(labels[split]),
                "per_class": np.bincount(labels[split], minlength=len(data.classes)).tolist(),
            }
            for split in SPLITS
        },
        "normalize": digests["train"][1],
        **data.extra,
    }
    write_json(tmp / "dataset.json", meta)
    return meta


def _write_images(
    data: SourceData, assign: np.ndarray, tmp: Path, show_progress: bool | None
) -> dict[str, tuple[str, Any]]:
    """Stream the source's chunks into the three split files; return per split the
    sha256 of its image bytes (and for train the normalisation stats)."""
    shape = data.image_shape
    counts = np.bincount(assign, minlength=len(SPLITS))
    writers = [
        _SplitWriter(tmp / f"{split}_images.npy", int(counts[s]), shape)
        for s, split in enumerate(SPLITS)
    ]
    stats = _ChannelSums(shape[2])
    start = 0
    try:
        description = f"prepare {data.params['source']}"
        with progress(description, len(assign), enabled=show_progress) as bar:
            for chunk in data.read_chunks():
                where = assign[start : start + len(chunk)]
                for s, writer in enumerate(writers):
                    rows = chunk[where == s]
                    writer.write(rows)
                    if s == 0:
                        stats.add(rows)
                start += len(chunk)
                bar.advance(len(chunk))
    finally:
        digests = [w.close() for w in writers] if start == len(assign) else []
        for w in writers:
            w.file.close()
    if start != len(assign):  # a source yielding the wrong row count is a cnnflow bug
        raise RuntimeError(f"source yielded {start} images, expected {len(assign)}")
    return {
        split: (digests[s], stats.normalize() if split == "train" else None)
        for s, split in enumerate(SPLITS)
    }


# ------------------------------------------------------------------------- version


def _version(
    shape: tuple[int, int, int],
    labels: dict[str, np.ndarray],
    image_digests: dict[str, str],
    classes: list[str],
) -> str:
    """sha256 (hex) of this UTF-8 text, one line each, every line ending in "\\n":

        cnnflow-dataset 1
        <split> <N> <H> <W> <C> <sha256 of images> <sha256 of labels>   (train, val, test)
        classes <json.dumps(classes)>

    where "sha256 of images" is over the split's uint8 (N, H, W, C) array in C order (the
    bytes after the .npy header) and "sha256 of labels" over its labels as little-endian
    int64. Hashing per split lets prepare hash while streaming chunks in original order.
    """
    lines = [f"cnnflow-dataset {FORMAT}"]
    for split in SPLITS:
        label_sha = hashlib.sha256(labels[split].astype("<i8").tobytes()).hexdigest()
        dims = " ".join(str(d) for d in (len(labels[split]), *shape))
        lines.append(f"{split} {dims} {image_digests[split]} {label_sha}")
    lines.append(f"classes {json.dumps(classes)}")
    return hashlib.sha256(("\n".join(lines) + "\n").encode("utf-8")).hexdigest()


def dataset_version(path: str | Path) -> str:
    """Recompute the version of a prepared directory from its files (streaming)."""
    ds = load_prepared(path)
    digests, labels = {}, {}
    for split in SPLITS:
        images = ds.images(split)
        sha = hashlib.sha256()
        rows = max(1, (16 << 20) // max(1, images[0].size if len(images) else 1))
        for start in range(0, len(images), rows):
            sha.update(np.ascontiguousarray(images[start : start + rows]).data)
        digests[split] = sha.hexdigest()
        labels[split] = np.asarray(ds.labels(split))
    return _version(tuple(ds.meta["image_shape"]), labels, digests, ds.meta["classes"])


# ------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared directory: its dataset.json and read-only memmaps of its arrays."""

    path: Path
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])

    def images(self, split: str) -> np.ndarray:
        """uint8 (N, H, W, C), memory-mapped read-only."""
        return self._load(split, "images")

    def labels(self, split: str) -> np.ndarray:
        """int64 (N,), memory-mapped read-only."""
        return self._load(split, "labels")

    def _load(self, split: str, kind: str) -> np.ndarray:
        if split not in SPLITS:
            raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        file = self.path / f"{split}_{kind}.npy"
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{file}: not a readable .npy file ({type(exc).__name__})") from None


_REQUIRED = ("version", "source", "params", "image_shape", "classes", "splits", "normalize")


def load_prepared(path: str | Path) -> PreparedDataset:
    """Open a directory written by `prepare`, or raise DataError saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no prepared data set here (run `cnnflow prepare` first)")
    meta_file = path / "dataset.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{meta_file}: missing; expected the dataset.json prepare writes") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_file}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_file}: expected format {FORMAT}, got {got!r}")
    missing = [key for key in _REQUIRED if key not in meta]
    if missing:
        raise DataError(f"{meta_file}: missing key(s) {', '.join(missing)}")
    for split in SPLITS:
        for kind in ("images", "labels"):
            if not (path / f"{split}_{kind}.npy").is_file():
                raise DataError(f"{path / f'{split}_{kind}.npy'}: missing; expected by {meta_file}")
    return PreparedDataset(path=path, meta=meta)
