"""Per-rank batches from WebDataset shards, in an exact, resumable order.

    loader = build_loader("data/shards", "train", batch_size=128, rank=r, world_size=w)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:          # uint8 (B, C, H, W), int64 (B,)
            x = normalize_batch(images, mean, std)

How an epoch is cut (why: every rank must see the same number of batches, or DDP hangs
in the last all-reduce of the epoch; and a restarted job must see the same batches):

1. the shard order is permuted by (seed, epoch) and the shards' samples concatenated;
2. rank r takes the contiguous range [r*S, (r+1)*S), S = N // world_size, so it reads
   whole shards plus at most two partial ones; the N % world_size leftovers at the end
   are skipped this epoch (which ones changes with the shard order);
3. the rank's S samples are permuted by (seed, epoch, rank) and cut into batches.

Samples are then read by random access (an offset index per shard, `os.preadv` into the
batch buffer), so the order depends on nothing but (seed, epoch, rank, world_size):
not on `num_workers`, and `start_batch=k` resumes exactly at batch k.

Shards in object storage (`s3://bucket/prefix`, `cnnflow.data.remote`): each rank fetches
only the shards it reads, each in one GET (retried with backoff), checks it against the
manifest's size and sha256, and keeps it in a local cache bounded by
`CNNFLOW_STORAGE_CACHE_BYTES`; the epoch plan above is the same, so are the guarantees.
"""

from __future__ import annotations

import ast
import functools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cnnflow import storage
from cnnflow.data.manifest import load_manifest, resolve_shard_dir, scan_tar, verify_shards
from cnnflow.data.remote import FETCH_THREADS, RemoteShards, check_listing
from cnnflow.data.remote import cache_bytes as remote_cache_bytes
from cnnflow.errors import ShardError

_PEEK = 256  # bytes of each member read while indexing: the .npy header and the label
_ORDER_STREAM, _RANK_STREAM = 0, 1  # keep the two random streams of an epoch apart


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std, per channel.

    Kept out of the loader so batches cross process boundaries as uint8 (4x less
    shared memory than float32) and training and evaluation normalise identically.
    """
    x = images.to(torch.float32).div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


# ---------------------------------------------------------------------------- index


def _npy_header(raw: bytes) -> tuple[int, tuple[int, ...]]:
    """(header length in bytes, shape) of a uint8 C-order .npy payload starting `raw`."""
    if not raw.startswith(b"\x93NUMPY") or len(raw) < 10:
        raise ValueError("not a .npy payload")
    hlen_bytes = 2 if raw[6] == 1 else 4
    hlen = int.from_bytes(raw[8 : 8 + hlen_bytes], "little")
    start = 8 + hlen_bytes
    if start + hlen > len(raw):
        raise ValueError(f".npy header longer than {_PEEK} bytes")
    return start + hlen, _npy_shape(raw[start : start + hlen])


@functools.lru_cache(maxsize=64)
def _npy_shape(header: bytes) -> tuple[int, ...]:
    """The shape in a .npy header dict; cached per header text (a data set's images share
    one), so indexing a shard parses it once, not once per sample."""
    meta = ast.literal_eval(header.decode("latin1"))
    if np.dtype(meta["descr"]) != np.uint8 or meta["fortran_order"]:
        raise ValueError(f"expected C-order uint8, found {meta['descr']}")
    return tuple(meta["shape"])


@functools.lru_cache(maxsize=4096)
def _index_shard(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixel offsets, labels) per sample of one shard, in tar order; cached per process.

    The key includes size and mtime, so a rewritten shard is indexed again.
    """
    # no header checksums: the file's sha256, which covers every header byte, was checked
    # before use (build_loader's verify, or its caller's; remote shards as fetched)
    members = scan_tar(path, peek=_PEEK, check=False)
    npy: dict[str, tuple[int, int, bytes]] = {}
    cls: dict[str, bytes] = {}
    for name, offset, length, head in members:
        key, _, ext = name.partition(".")
        if ext == "npy":
            npy[key] = (offset, length, head)
        elif ext == "cls":
            cls[key] = head
    offsets, labels = np.empty(len(npy), np.int64), np.empty(len(npy), np.int64)
    for i, (key, (offset, _length, head)) in enumerate(npy.items()):
        if key not in cls:
            raise ShardError(f"{path}: sample {key} has an image but no .cls label")
        try:
            skip, _ = _npy_header(head[:_PEEK])
            labels[i] = int(cls[key])
        except ValueError as exc:
            raise ShardError(f"{path}: sample {key}: unreadable ({exc})") from None
        offsets[i] = offset + skip
    return offsets, labels


def _shard_index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ShardError(f"{path}: shard listed in the manifest is missing") from None
    return _index_shard(str(path), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------- epoch plan


def epoch_samples(
    counts: Sequence[int], *, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, position in shard) of each sample rank `rank` reads, in order."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    order = np.arange(len(counts_arr))
    if shuffle:
        order = np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(order)
    per_rank = int(counts_arr.sum()) // world_size
    shard = np.repeat(order, counts_arr[order])
    starts = np.cumsum(counts_arr[order]) - counts_arr[order]
    position = np.arange(len(shard)) - np.repeat(starts, counts_arr[order])
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    shard, position = shard[mine], position[mine]
    if shuffle:
        perm = np.random.default_rng([seed, epoch, _RANK_STREAM, rank]).permutation(per_rank)
        shard, position = shard[perm], position[perm]
    return shard, position


class _EpochBatches(Dataset):
    """Map-style: item b = batch b of one epoch, so DataLoader workers keep the order."""

    def __init__(
        self,
        paths: list[str],
        shard: np.ndarray,
        offset: np.ndarray,
        label: np.ndarray,
        batch_size: int,
        shape: tuple[int, int, int],
        num_batches: int,
        remote: RemoteShards | None = None,
    ) -> None:
        self.paths, self.shard, self.offset, self.label = paths, shard, offset, label
        self.batch_size, self.shape, self.num_batches = batch_size, shape, num_batches
        self.remote = remote
        self._fds: dict[int, int] = {}  # shard index -> open fd, per process

    def __len__(self) -> int:
        return self.num_batches

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            path = self.paths[shard] if self.remote is None else self.remote.local(shard)
            self._fds[shard] = os.open(path, os.O_RDONLY)
        return self._fds[shard]

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = slice(b * self.batch_size, (b + 1) * self.batch_size)
        shards, offsets = self.shard[part].tolist(), self.offset[part].tolist()
        out = np.empty((len(shards), *self.shape), dtype=np.uint8)
        nbytes = out[0].nbytes if len(out) else 0
        flat = memoryview(out.reshape(-1))
        for j, (shard, offset) in enumerate(zip(shards, offsets, strict=True)):
            target = flat[j * nbytes : (j + 1) * nbytes]
            got = os.preadv(self._fd(shard), [target], offset)  # straight into the batch
            if got != nbytes:
                raise ShardError(f"{self.paths[shard]}: short read at byte {offset}")
        images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
        return images, torch.from_numpy(self.label[part].copy())

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}  # descriptors do not cross processes

    def __del__(self) -> None:
        for fd in self.__dict__.get("_fds", {}).values():
            os.close(fd)


class ShardLoader:
    """Iterable of (uint8 images NCHW, int64 labels) for one rank; see the module doc."""

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        split: str,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        shuffle: bool,
        drop_last: bool,
    ) -> None:
        self.root, self.manifest, self.split = root, manifest, split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.num_workers = seed, num_workers
        self.shuffle, self.drop_last = shuffle, drop_last
        entries = manifest["splits"][split]["shards"]
        self.paths = [str(storage.join(root, e["name"])) for e in entries]
        self.remote = RemoteShards(self.paths, entries) if storage.is_remote(root) else None
        self.counts = [int(e["samples"]) for e in entries]
        self.shape = tuple(int(d) for d in manifest["image_shape"])
        self.samples_per_rank = sum(self.counts) // world_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; the next iteration starts at batch `start_batch`."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch: expected 0..{len(self)}, got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def _batches(self) -> _EpochBatches:
        shard, position = epoch_samples(
            self.counts,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
        )
        used = len(self) * self.batch_size if self.drop_last else len(shard)
        shard, position = shard[:used], position[:used]
        offset, label = np.empty(used, np.int64), np.empty(used, np.int64)
        for s, (offsets, labels) in self._indexes(np.unique(shard).tolist()).items():
            if len(offsets) != self.counts[s]:
                raise ShardError(
                    f"{self.paths[s]}: {len(offsets)} samples found, "
                    f"the manifest expects {self.counts[s]}"
                )
            mask = shard == s
            offset[mask], label[mask] = offsets[position[mask]], labels[position[mask]]
        return _EpochBatches(
            self.paths, shard, offset, label, self.batch_size, self.shape, len(self),
            self.remote,
        )

    def _indexes(self, shards: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """The index of each shard this rank reads. Remote shards are fetched and indexed
        FETCH_THREADS at a time (one indexes while others wait on their GETs), unless the
        cache is bounded: then one by one, so a shard is not evicted before it is read."""
        def index(s: int) -> tuple[np.ndarray, np.ndarray]:
            return _shard_index(Path(self.paths[s] if self.remote is None
                                     else self.remote.local(s)))

        if self.remote is None or remote_cache_bytes() > 0 or len(shards) < 2:
            return {s: index(s) for s in shards}
        with ThreadPoolExecutor(min(FETCH_THREADS, len(shards))) as pool:
            return dict(zip(shards, pool.map(index, shards), strict=True))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        todo = range(self.start_batch, len(batches))
        if self.num_workers == 0:
            return (batches[b] for b in todo)
        loader = DataLoader(batches, batch_size=None, sampler=todo, num_workers=self.num_workers)
        return iter(loader)


def build_loader(
    shards: str | Path,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    num_workers: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    expected_version: str | None = None,
    verify: bool = True,
) -> ShardLoader:
    """A loader over `split` of the shard directory (path or file:// URI) for one rank.

    With `verify`, every shard of the split is checked against the manifest first
    (size, sha256, sample count), so damage shows up here rather than mid-epoch; in object
    storage one listing checks the sizes, and each shard's sha256 is checked when this
    rank fetches it (no rank downloads the whole set).
    `expected_version` (the prepared data set's version) guards against training on
    shards of another data set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < size")
    if num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers}")
    root = resolve_shard_dir(shards)
    if storage.is_remote(root):
        manifest = load_manifest(root)
        if verify and split in manifest["splits"]:
            check_listing(root, manifest["splits"][split]["shards"])
    else:
        manifest = verify_shards(root, splits=[split]) if verify else load_manifest(root)
    if split not in manifest["splits"]:
        raise ShardError(f"{root}: no split {split!r} in the manifest")
    found = manifest["dataset_version"]
    if expected_version is not None and found != expected_version:
        raise ShardError(
            f"{root}: shards are of dataset version {found[:12]}…, expected "
            f"{expected_version[:12]}… (re-run `cnnflow shard` on the prepared data)"
        )
    total = manifest["splits"][split]["samples"]
    if total // world_size == 0:
        raise ShardError(
            f"{root}: split {split!r} has {total} samples, too few for world size "
            f"{world_size} (each rank needs at least one)"
        )
    loader = ShardLoader(
        root,
        manifest,
        split,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
        shuffle=shuffle,
        drop_last=drop_last,
    )
    loader.set_epoch(epoch, start_batch)
    return loader
