"""The `prepare` and `shard` sections of params.yaml, used by `cnnflow.data`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cnnflow.errors import check_config as _check

# The `prepare.source` values; PrepareConfig.source spells them again as a Literal.
SOURCES = ("digits", "synthetic", "imagefolder", "idx", "cifar")


@dataclass(kw_only=True)
class PrepareConfig:
    """Read a source, split it, and write `out_dir` (uint8 arrays + dataset.json)."""

    source: Literal["digits", "synthetic", "imagefolder", "idx", "cifar"] = "digits"
    """Where the images come from. `digits` ships inside scikit-learn (no download)."""
    path: str = ""
    """Input for imagefolder (root/<class>/<image>), idx (a directory holding the
    *-images-idx3-ubyte[.gz] and *-labels-idx1-ubyte[.gz] files) and cifar (the
    cifar-10-batches-py directory); a local directory or an object storage prefix
    (s3://bucket/raw, copied to a local cache first). Unused by digits and synthetic."""
    out_dir: str = "data/prepared"
    """Where the prepared data set is written (atomically: temp dir, then rename). Always
    local: the shard stage memory-maps it, and it is the cache shards are uploaded from."""
    seed: int = 0
    """Seed of the stratified split (and of the synthetic generator)."""
    train_ratio: float = 0.8
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    """Split ratios; they must sum to 1. Each class must get >= 1 sample in every split."""
    height: int = 0
    width: int = 0
    """Image size in pixels. imagefolder resizes to it (0 = 32); synthetic generates it
    (0 = 32); digits, idx and cifar keep their native size and require 0 or that size."""
    channels: int = 0
    """1 (grayscale) or 3 (RGB). imagefolder converts to it (0 = 3); synthetic generates
    it (0 = 3); digits/idx are 1 and cifar is 3 (0 or that value)."""
    num_images: int = 10_000
    """synthetic only: how many images (>= 1,000,000 works: generated in chunks)."""
    num_classes: int = 10
    """synthetic only: how many classes."""
    skip_corrupt: bool = False
    """imagefolder only: skip unreadable images (counted in the log) instead of failing."""
    workers: int = 2
    """Processes for generating/encoding (synthetic and imagefolder); 1 = in-process."""

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "prepare.seed", "an int >= 0", self.seed)
        for name in ("train_ratio", "val_ratio", "test_ratio"):
            value = getattr(self, name)
            _check(0.0 < value < 1.0, f"prepare.{name}", "a ratio in (0, 1)", value)
        total = self.train_ratio + self.val_ratio + self.test_ratio
        _check(
            abs(total - 1.0) < 1e-9,
            "prepare.train_ratio+val_ratio+test_ratio",
            "a sum of 1",
            round(total, 12),
        )
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(0 <= value <= 4096, f"prepare.{name}", "0 (native) or 1..4096 pixels", value)
        _check(self.channels in (0, 1, 3), "prepare.channels", "0, 1 or 3", self.channels)
        _check(self.num_images >= 1, "prepare.num_images", "an int >= 1", self.num_images)
        _check(
            2 <= self.num_classes <= 65535, "prepare.num_classes", "2..65535", self.num_classes
        )
        _check(1 <= self.workers <= 64, "prepare.workers", "1..64", self.workers)
        needs_path = self.source in ("imagefolder", "idx", "cifar")
        _check(
            bool(self.path) or not needs_path,
            "prepare.path",
            f"the input path for source {self.source!r}",
            self.path,
        )


@dataclass(kw_only=True)
class ShardConfig:
    """Write WebDataset tar shards of the prepared data set plus a checksummed manifest."""

    out_dir: str = "data/shards"
    """Shard directory: <split>-000000.tar ... and manifest.json; or an object storage
    prefix (s3://bucket/shards: tars uploaded first, manifest.json last)."""
    samples_per_shard: int = 256
    """Samples per tar shard. Rule of thumb: 100-500 MB shards on object storage;
    here small shards let several ranks and loader workers each own whole shards."""
    workers: int = 2
    """Processes writing shards in parallel (1 = in-process)."""

    def __post_init__(self) -> None:
        _check(
            self.samples_per_shard >= 1,
            "shard.samples_per_shard",
            "an int >= 1",
            self.samples_per_shard,
        )
        _check(1 <= self.workers <= 64, "shard.workers", "1..64", self.workers)
