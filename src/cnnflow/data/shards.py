"""WebDataset tar shards of a prepared data set: write, index, verify.

    manifest = write_shards("data/prepared", "data/shards", samples_per_shard=1000)
    verify_shards("data/shards")               # raises ShardError on any mismatch

Each split becomes `{split}-000000.tar`, `{split}-000001.tar`, ... with one sample per
image: `{split}-{index:08d}.npy` (the HWC uint8 image as a .npy file) and
`{split}-{index:08d}.cls` (the label as ASCII digits). Any WebDataset reader decodes them
(`wds.WebDataset(url).decode()` gives back the numpy array and the int).

`manifest.json` records the data set version, shape, classes, normalisation and, per
shard, its sample count, size and sha256, so a loader can refuse stale or damaged shards
before a long training run starts instead of failing (or silently training) mid-way.

Shards are byte-for-byte reproducible: same prepared data + same `samples_per_shard`
-> same tar bytes and the same manifest, whatever the number of workers. That is what
lets DVC cache them and lets the manifest's checksums identify the content.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from cnnflow.errors import ShardError
from cnnflow.progress import progress

FORMAT = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
_BLOCK = 512  # bytes: a tar header, and the unit tar pads every member's data to
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (ord("0"), 0)  # tar type flags of a regular file
_FLUSH_BYTES = 4 << 20  # 4 MiB: few large writes, bounded memory per writer
_IN_MEMORY_BYTES = 256 << 20  # 256 MiB: verify holds a shard this small in memory


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


@functools.cache
def _writer_class() -> type:
    """The TarWriter subclass, built on first use: importing webdataset imports torch
    (about 2 s), which the shard stage and its pool workers otherwise never need."""
    import webdataset as wds

    class _ReproducibleTarWriter(wds.TarWriter):
        """A TarWriter with fixed metadata and a cached header template per member size.

        Fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode 0o644) makes the
        tar bytes depend only on the samples. `TarWriter.write` builds every header through
        `tarfile` (~25 us per member); all members of one size share the same header except
        for the name and checksum, so this class patches a template instead. The bytes are
        identical to `TarWriter.write` (tests compare them); names that do not fit the
        100-byte USTAR name field take TarWriter's own path.
        """

        def __init__(self, fileobj: Any) -> None:
            super().__init__(io.BytesIO(), user="", group="", mode=0o644, mtime=0, encoder=False)
            # TarWriter always opens a stream-mode archive ("w|"), which pushes every write
            # through a 10 KiB buffer, re-slicing it each time. Plain "w" mode on the same
            # file writes identical bytes and lets whole runs of samples go out in one write.
            self.stream = fileobj
            self.tarstream = tarfile.open(  # noqa: SIM115 - closed by TarWriter.close
                fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT
            )
            self._templates: dict[int, tuple[bytes, int]] = {}
            self._pending: list[bytes] = []
            self._pending_bytes = 0

        def _template(self, size: int) -> tuple[bytes, int]:
            """(header with an empty name field, checksum of that header) for `size`."""
            if size not in self._templates:
                info = tarfile.TarInfo("x")
                info.size, info.mtime, info.mode = size, self.mtime, self.mode
                info.uname, info.gname = self.user, self.group
                header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
                header[0:100] = bytes(100)
                header[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
                self._templates[size] = (bytes(header), sum(header))
            return self._templates[size]

        def _header(self, name: bytes, size: int) -> bytes:
            template, base = self._template(size)
            checksum = base + sum(name)
            return (name.ljust(100, b"\0") + template[100:148] + b"%06o\0 " % checksum
                    + template[156:])

        def write(self, obj: dict[str, Any]) -> int:
            key = obj["__key__"]
            parts, total = [], 0
            for ext in sorted(obj):
                if ext.startswith("_"):
                    continue
                name = f"{key}.{ext}".encode()
                data = obj[ext]
                if len(name) > 100 or not name.isascii():
                    return super().write(obj)
                pad = -len(data) % _BLOCK
                parts += [self._header(name, len(data)), data, bytes(pad)]
                total += len(data)
            # What TarFile.addfile does, minus rebuilding the header: append and advance.
            self._pending += parts
            self._pending_bytes += sum(len(p) for p in parts)
            if self._pending_bytes >= _FLUSH_BYTES:
                self._flush()
            return total

        def _flush(self) -> None:
            block = b"".join(self._pending)
            self.tarstream.fileobj.write(block)
            self.tarstream.offset += len(block)
            self._pending, self._pending_bytes = [], 0

        def close(self) -> None:
            self._flush()
            super().close()

    return _ReproducibleTarWriter


class _HashingFile:
    """A write-only file that counts and sha256-hashes what goes through it."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.size, self.sha256 = raw, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


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
        with _writer_class()(hashing) as writer:
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


def _read_json(path: Path, missing: str, invalid: str) -> Any:
    """`path`'s JSON; ShardError "<path>: <missing>" or "<path>: <invalid> (why)"."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: {missing}") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: {invalid} ({exc})") from None


def _read_dataset_json(prepared: Path) -> dict[str, Any]:
    path = prepared / "dataset.json"
    meta = _read_json(path, "not found; run `cnnflow prepare` first", "not valid JSON")
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


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` so that a crash leaves either the old or the new copy."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    """
    if samples_per_shard < 1:
        raise ShardError(f"samples_per_shard: expected an int >= 1, got {samples_per_shard}")
    prepared, out = Path(prepared_dir), Path(out_dir)
    meta = _read_dataset_json(prepared)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tasks = _plan_tasks(prepared, meta, tmp, samples_per_shard)
        entries = _run_tasks(tasks, workers, show_progress)
        manifest = _manifest(meta, samples_per_shard, entries)
        (tmp / MANIFEST).write_text(
            json.dumps(manifest, sort_keys=True, indent=2) + "\n", encoding="utf-8"
        )
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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


# ---------------------------------------------------------------------------- reading


def resolve_shard_dir(uri: str | Path) -> Path:
    """A local directory from a path or a `file://` URI; other schemes are refused."""
    text = str(uri)
    if "://" not in text:
        return Path(text)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme != "file":
        raise ShardError(
            f"{text}: unsupported URI scheme {parsed.scheme!r}; "
            "use a local path or file:// (mount object storage as a volume)"
        )
    host = "" if parsed.netloc in ("", "localhost") else parsed.netloc
    return Path(host + urllib.parse.unquote(parsed.path))


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check `manifest.json`; ShardError naming the file otherwise."""
    path = resolve_shard_dir(shard_dir) / MANIFEST
    manifest = _read_json(path, "manifest not found; run `cnnflow shard` first",
                          "not a valid manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardError(f"{path}: invalid manifest: {problem}")
    return manifest


read_manifest = load_manifest  # the name the trainer imports


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "expected a JSON object"
    if manifest.get("format") != FORMAT:
        return f"format {manifest.get('format')!r} (expected {FORMAT})"
    for key in ("dataset_version", "image_shape", "classes", "splits"):
        if key not in manifest:
            return f"missing key {key!r}"
    if not isinstance(manifest["splits"], dict):
        return "splits: expected an object"
    for split, info in manifest["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            return f"splits.{split}.shards: expected a list"
        for i, shard in enumerate(shards):
            ok = isinstance(shard, dict) and all(
                isinstance(shard.get(k), t)
                for k, t in (("name", str), ("samples", int), ("bytes", int), ("sha256", str))
            )
            if not ok or "/" in shard["name"]:
                return f"splits.{split}.shards[{i}]: expected name, samples, bytes, sha256"
    return None


def scan_tar(
    path: str | Path, peek: int = 0, *, data: bytes | None = None, check: bool = True
) -> list[tuple[str, int, int, bytes]]:
    """List a tar's regular members as (name, data offset, data size, first bytes).

    Walks the 512-byte headers with positioned reads, so only the headers (and `peek`
    bytes of each member's data) are read, never the images; pass `data` (the whole
    file) to walk it in memory instead. `check=False` skips the header checksums (for a
    file whose sha256 was just verified). Archives with PAX or GNU extension headers fall
    back to `tarfile`. Raises ShardError naming `path` on a damaged archive.
    """
    if data is not None:
        return _walk(path, len(data), lambda at, n: data[at : at + n], peek, check)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return _walk(path, size, lambda at, n: os.pread(fd, n, at), peek, check)
    finally:
        os.close(fd)


def _walk(path: str | Path, size: int, read: Any, peek: int, check: bool) -> list:
    members, offset = [], 0
    while offset + _BLOCK <= size:
        head = read(offset, _BLOCK + peek)
        header = head[:_BLOCK]
        if header == _ZERO_BLOCK:
            return members  # end-of-archive marker
        if header[156] not in _REGULAR or header[124] & 0x80 or header[345]:
            return _scan_with_tarfile(path, peek)  # PAX/GNU headers, long names, huge sizes
        try:
            length = int(header[124:136].strip(b"\0 ") or b"0", 8)
            checksum = int(header[148:156].strip(b"\0 ") or b"0", 8) if check else 0
        except ValueError:
            raise ShardError(f"{path}: damaged tar header at byte {offset}") from None
        if check and checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError(f"{path}: damaged tar header at byte {offset} (bad checksum)")
        name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
        if offset + _BLOCK + length > size:
            raise ShardError(f"{path}: truncated: member {name} ends past the end of the file")
        members.append((name, offset + _BLOCK, length, head[_BLOCK : _BLOCK + min(peek, length)]))
        offset += _BLOCK + length + (-length % _BLOCK)
    raise ShardError(f"{path}: truncated: no end-of-archive marker")


def _scan_with_tarfile(path: str | Path, peek: int) -> list[tuple[str, int, int, bytes]]:
    members = []
    try:
        with tarfile.open(path, "r:") as tar, open(path, "rb") as f:
            for info in tar:
                if info.isreg():
                    f.seek(info.offset_data)
                    members.append(
                        (info.name, info.offset_data, info.size, f.read(min(peek, info.size)))
                    )
    except tarfile.TarError as exc:
        raise ShardError(f"{path}: not a readable tar file ({exc})") from None
    return members


def count_samples(path: str | Path, *, data: bytes | None = None) -> int:
    """Samples in a shard: distinct keys (member name up to the first dot of its basename)."""
    keys = set()
    for name, _, _, _ in scan_tar(path, data=data, check=data is None):
        directory, _, base = name.rpartition("/")
        keys.add(directory + "/" + base.split(".", 1)[0])
    return len(keys)


def _sha256(path: Path, keep: bool) -> tuple[str, bytes | None]:
    """The file's sha256, and its bytes when `keep` (to count samples without re-reading)."""
    with open(path, "rb") as f:
        if keep:
            data = f.read()
            return hashlib.sha256(data).hexdigest(), data
        digest = hashlib.sha256()
        while chunk := f.read(4 << 20):  # 4 MiB reads
            digest.update(chunk)
    return digest.hexdigest(), None


def _verify_shard(path: Path, entry: dict[str, Any]) -> None:
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(
            f"{path}: size {size} bytes does not match the manifest "
            f"(expected {entry['bytes']}; truncated or rewritten?)"
        )
    digest, data = _sha256(path, keep=size <= _IN_MEMORY_BYTES)
    if digest != entry["sha256"]:
        raise ShardError(
            f"{path}: sha256 {digest[:12]}… does not match the manifest "
            f"(expected {entry['sha256'][:12]}…)"
        )
    samples = count_samples(path, data=data)
    if samples != entry["samples"]:
        raise ShardError(
            f"{path}: {samples} samples found, the manifest expects {entry['samples']}"
        )


def verify_shards(
    shard_dir_or_uri: str | Path, *, splits: list[str] | tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Check every shard of `splits` (default: all) against the manifest; return it.

    Size, sha256 and sample count per shard: a partial copy, a flipped bit or a shard
    from another data set version fails here, naming the file, before training starts.
    """
    root = resolve_shard_dir(shard_dir_or_uri)
    manifest = load_manifest(root)
    wanted = list(manifest["splits"]) if splits is None else list(splits)
    for split in wanted:
        if split not in manifest["splits"]:
            raise ShardError(
                f"{root / MANIFEST}: no split {split!r}; "
                f"has {', '.join(manifest['splits']) or 'none'}"
            )
        for entry in manifest["splits"][split]["shards"]:
            _verify_shard(root / entry["name"], entry)
    return manifest
