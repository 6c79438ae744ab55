"""WebDataset tar shards of a prepared data set: write them and their manifest.

    manifest = write_shards("data/prepared", "data/shards", samples_per_shard=1000)
    verify_shards("data/shards")     # cnnflow.data.manifest: ShardError on any mismatch

Each split becomes `{split}-000000.tar`, `{split}-000001.tar`, ... with one sample per
image: `{split}-{index:08d}.npy` (the HWC uint8 image as a .npy file) and
`{split}-{index:08d}.cls` (the label as ASCII digits). Any WebDataset reader decodes them
(`wds.WebDataset(url).decode()` gives back the numpy array and the int).

`manifest.json` (format and checks: `cnnflow.data.manifest`) records the data set
version, shape, classes, normalisation and, per shard, its sample count, size and sha256.

Shards are byte-for-byte reproducible: same prepared data + same `samples_per_shard`
-> same tar bytes and the same manifest, whatever the number of workers. That is what
lets DVC cache them and lets the manifest's checksums identify the content.

The tars are written with the standard library only, byte-identical to webdataset's
`TarWriter(user="", group="", mode=0o644, mtime=0, encoder=False)` (tests compare them):
importing webdataset imports torch (about 2 s), which the shard stage and its pool
workers never need.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from cnnflow import storage
from cnnflow.data.manifest import FORMAT, MANIFEST, read_json
from cnnflow.errors import ShardError
from cnnflow.fileio import atomic_dir, write_json
from cnnflow.outputs import SPOOL, mark_output
from cnnflow.progress import progress

SPLITS = ("train", "val", "test")
_BLOCK = tarfile.BLOCKSIZE  # 512 bytes: a tar header, and the unit tar pads data to
_RECORD = tarfile.RECORDSIZE  # 10240 bytes: tar pads the whole archive to a multiple
_FLUSH_BYTES = 4 << 20  # 4 MiB: few large writes, bounded memory per writer


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy v1.0 header of a C-ordered uint8 array of `shape`.

    Built once per shape: a sample's payload is this header + the raw pixel bytes,
    which is exactly what `np.save` would write, without encoding every sample again.
    """
    buf = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": tuple(int(d) for d in shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


# ---------------------------------------------------------------------------- writing


class TarShardWriter:
    """Writes WebDataset samples as a tar with fixed metadata, in few large writes.

    Fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode 0o644) makes the
    bytes depend only on the samples. Building every header through `tarfile` costs
    ~25 us per member; all members of one size share the same header except for the
    name and checksum, so this patches a cached template instead. Names longer than the
    100-byte USTAR name field get their header from `tarfile.TarInfo` (USTAR format).

        with TarShardWriter(f) as writer:
            writer.write({"__key__": "train-00000000", "npy": ..., "cls": b"3"})
    """

    def __init__(self, fileobj: Any) -> None:
        self.fileobj = fileobj
        self.offset = 0  # bytes written so far, as tarfile counts them
        self._templates: dict[int, tuple[bytes, int]] = {}
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _info(name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
        return info

    def _template(self, size: int) -> tuple[bytes, int]:
        """(header with an empty name field, checksum of that header) for `size`."""
        if size not in self._templates:
            header = bytearray(self._info("x", size).tobuf(tarfile.USTAR_FORMAT, "utf-8",
                                                          "surrogateescape"))
            header[0:100] = bytes(100)
            header[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
            self._templates[size] = (bytes(header), sum(header))
        return self._templates[size]

    def _header(self, name: str, size: int) -> bytes:
        encoded = name.encode("utf-8", "surrogateescape")
        if len(encoded) > 100:
            return self._info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8",
                                                "surrogateescape")
        template, base = self._template(size)
        checksum = base + sum(encoded)
        return (encoded.ljust(100, b"\0") + template[100:148] + b"%06o\0 " % checksum
                + template[156:])

    def write(self, sample: dict[str, Any]) -> int:
        """Append one sample's members (`key.ext`, sorted by ext); return its data bytes."""
        key, total = sample["__key__"], 0
        for ext in sorted(sample):
            if ext.startswith("_"):
                continue
            data = sample[ext]
            self._pending += [self._header(f"{key}.{ext}", len(data)), data,
                              bytes(-len(data) % _BLOCK)]
            self._pending_bytes += _BLOCK + len(data) + (-len(data) % _BLOCK)
            total += len(data)
        if self._pending_bytes >= _FLUSH_BYTES:
            self._flush()
        return total

    def _flush(self) -> None:
        block = b"".join(self._pending)
        self.fileobj.write(block)
        self.offset += len(block)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        """End the archive as tarfile does: two zero blocks, then zeros up to a record."""
        self._pending.append(bytes(2 * _BLOCK))
        self._pending_bytes += 2 * _BLOCK
        self._pending.append(bytes(-(self.offset + self._pending_bytes) % _RECORD))
        self._flush()


class _HashingFile:
    """A write-only file that counts and sha256-hashes what goes through it."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.size, self.sha256 = raw, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)


_ARRAYS: dict[str, np.ndarray] = {}  # path -> memmap, per process: opened once per worker


def _array(path: str) -> np.ndarray:
    if path not in _ARRAYS:
        _ARRAYS[path] = np.load(path, mmap_mode="r")
    return _ARRAYS[path]


def _write_shard(task: tuple[str, str, str, str, int, int, int]) -> dict[str, Any]:
    """Write one shard (runs in a pool worker); return its manifest entry."""
    prepared, out, split, name, first, stop, index = task
    images = _array(os.path.join(prepared, f"{split}_images.npy"))
    labels = _array(os.path.join(prepared, f"{split}_labels.npy"))
    block = np.ascontiguousarray(images[first:stop])  # one read of the whole slice
    raw = memoryview(block.reshape(-1))
    step = block[0].nbytes if len(block) else 0  # bytes per image
    header = npy_header(images.shape[1:])
    labels_list = [int(v) for v in labels[first:stop]]
    with open(os.path.join(out, name), "wb", buffering=0) as f:
        hashing = _HashingFile(f)
        with TarShardWriter(hashing) as writer:
            for i in range(stop - first):
                writer.write(
                    {
                        "__key__": sample_key(split, first + i),
                        "cls": b"%d" % labels_list[i],
                        "npy": header + raw[i * step : (i + 1) * step],
                    }
                )
    return {
        "name": name,
        "samples": stop - first,
        "bytes": hashing.size,
        "sha256": hashing.sha256.hexdigest(),
        "_split": split,
        "_index": index,
    }


def _read_dataset_json(prepared: Path) -> dict[str, Any]:
    path = prepared / "dataset.json"
    meta = read_json(path, "not found; run `cnnflow prepare` first", "not valid JSON")
    for key in ("version", "image_shape", "classes", "splits"):
        if key not in meta:
            raise ShardError(f"{path}: missing key {key!r}")
    return meta


def _plan_tasks(
    prepared: Path, meta: dict[str, Any], out: Path, samples_per_shard: int
) -> list[tuple[str, str, str, str, int, int, int]]:
    """One task per shard, checking each split's arrays against dataset.json."""
    tasks = []
    for split in [s for s in SPLITS if s in meta["splits"]]:
        images = prepared / f"{split}_images.npy"
        labels = prepared / f"{split}_labels.npy"
        for path in (images, labels):
            if not path.is_file():
                raise ShardError(f"{path}: not found (dataset.json lists split {split!r})")
        arr, lab = np.load(images, mmap_mode="r"), np.load(labels, mmap_mode="r")
        count = meta["splits"][split].get("count", len(arr))
        if arr.dtype != np.uint8 or list(arr.shape[1:]) != list(meta["image_shape"]):
            raise ShardError(
                f"{images}: expected uint8 images of shape {meta['image_shape']}, "
                f"found {arr.dtype} {list(arr.shape[1:])}"
            )
        if len(arr) != count or len(lab) != count:
            raise ShardError(
                f"{images}: expected {count} images and labels (dataset.json), "
                f"found {len(arr)} images and {len(lab)} labels"
            )
        for index, first in enumerate(range(0, count, samples_per_shard)):
            stop = min(first + samples_per_shard, count)
            tasks.append(
                (str(prepared), str(out), split, shard_name(split, index), first, stop, index)
            )
    return tasks


def _run_tasks(tasks: list, workers: int, show_progress: bool | None) -> list[dict[str, Any]]:
    total = sum(t[5] - t[4] for t in tasks)
    results = []
    with progress("shard", total, enabled=show_progress) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                results.append(_write_shard(task))
                bar.advance(task[5] - task[4])
        else:
            with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
                for entry in pool.imap_unordered(_write_shard, tasks):
                    results.append(entry)
                    bar.advance(entry["samples"])
    return sorted(results, key=lambda e: (SPLITS.index(e["_split"]), e["_index"]))


def write_shards(
    prepared_dir: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int,
    workers: int = 2,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Shard every split of `prepared_dir` into `out_dir`; return the manifest.

    Written into a temporary sibling directory and swapped in at the end, so a failure
    leaves a previous good `out_dir` untouched. `workers` processes write whole shards
    in parallel, each reading its slice of the memory-mapped arrays.

    An object storage `out_dir` (`s3://bucket/prefix`) is written locally first, then
    uploaded by `publish`: tars, and manifest.json last.
    """
    if samples_per_shard < 1:
        raise ShardError(f"samples_per_shard: expected an int >= 1, got {samples_per_shard}")
    prepared = Path(prepared_dir)
    meta = _read_dataset_json(prepared)
    if storage.is_remote(out_dir):
        remote = str(out_dir).rstrip("/")
        _check_prefix(remote, meta["version"])
        stage = storage.staging_dir(remote, "shards")
        manifest = write_shards(prepared, stage, samples_per_shard=samples_per_shard,
                                workers=workers, show_progress=show_progress)
        publish(stage, remote, manifest)
        return manifest
    out = Path(out_dir)
    with atomic_dir(out, keep=(SPOOL,)) as tmp:
        mark_output("shard", tmp)
        tasks = _plan_tasks(prepared, meta, tmp, samples_per_shard)
        entries = _run_tasks(tasks, workers, show_progress)
        manifest = _manifest(meta, samples_per_shard, entries)
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _check_prefix(uri: str, version: str) -> None:
    """Refuse a prefix that holds another data set version, or objects that are not ours."""
    sizes = storage.list_sizes(uri)
    if MANIFEST in sizes:
        theirs = read_json(storage.join(uri, MANIFEST), "", "not a valid manifest")
        found = theirs.get("dataset_version", "?") if isinstance(theirs, dict) else "?"
        if found != version:
            raise ShardError(
                f"{uri}: holds shards of dataset version {str(found)[:12]}…, these are "
                f"{version[:12]}…; choose another shard.out_dir (a prefix per version)")
    foreign = [n for n in sizes if n != MANIFEST and not _is_shard_name(n)]
    if foreign:
        raise ShardError(f"{uri}: holds other objects ({', '.join(sorted(foreign)[:3])}); "
                         "shard.out_dir must be a prefix of its own")


def _is_shard_name(name: str) -> bool:
    split, _, rest = name.partition("-")
    return split in SPLITS and rest.endswith(".tar") and rest[:-4].isdigit()


def publish(local: Path, uri: str, manifest: dict[str, Any]) -> None:
    """Upload a shard set: the old manifest is withdrawn first (when it differs), then the
    tars go up, then the new manifest.json; a reader sees a complete set or none."""
    new = (local / MANIFEST).read_bytes()
    manifest_uri = str(storage.join(uri, MANIFEST))
    sizes = storage.list_sizes(uri)
    if MANIFEST in sizes and storage.read_bytes(manifest_uri) == new:
        return  # the same bytes are already published (shards are reproducible)
    storage.delete(manifest_uri)
    names = {e["name"] for s in manifest["splits"].values() for e in s["shards"]}
    for name in sorted(names):
        storage.put_file(local / name, str(storage.join(uri, name)))
    storage.write_bytes(manifest_uri, new)
    for stale in sorted(set(sizes) - names - {MANIFEST}):
        storage.delete(str(storage.join(uri, stale)))


def _manifest(meta: dict[str, Any], samples_per_shard: int, entries: list) -> dict[str, Any]:
    splits: dict[str, Any] = {
        s: {"samples": 0, "shards": []} for s in SPLITS if s in meta["splits"]
    }
    for entry in entries:
        split = splits[entry.pop("_split")]
        entry.pop("_index")
        split["shards"].append(entry)
        split["samples"] += entry["samples"]
    return {
        "format": FORMAT,
        "dataset_version": meta["version"],
        "image_shape": list(meta["image_shape"]),
        "classes": list(meta["classes"]),
        "normalize": meta.get("normalize", {}),
        "samples_per_shard": samples_per_shard,
        "splits": splits,
    }
