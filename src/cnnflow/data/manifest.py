"""The shard manifest and checks against it: read, resolve a shard URI, verify, scan tars.

    manifest = load_manifest("data/shards")    # ShardError naming the file if invalid
    verify_shards("data/shards")               # raises ShardError on any mismatch
    members = scan_tar("data/shards/train-000000.tar", peek=256)

`manifest.json` (written by `cnnflow.data.shards.write_shards`) records the data set
version, shape, classes, normalisation and, per shard, its sample count, size and sha256,
so a loader can refuse stale or damaged shards before a long training run starts instead
of failing (or silently training) mid-way.

Imports only the standard library: `cnnflow verify` and the loader's index never need
torch or webdataset to read a manifest or a tar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from cnnflow import storage
from cnnflow.errors import ShardError

log = logging.getLogger("cnnflow")

FORMAT = 1
MANIFEST = "manifest.json"
_BLOCK = tarfile.BLOCKSIZE  # 512 bytes: a tar header, and the unit tar pads data to
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (ord("0"), 0)  # tar type flags of a regular file
_IN_MEMORY_BYTES = 256 << 20  # 256 MiB: verify holds a shard this small in memory


def read_json(path: Path | str, missing: str, invalid: str) -> Any:
    """`path`'s JSON (a local file or an object URI); ShardError "<path>: <missing>" or
    "<path>: <invalid> (why)"."""
    try:
        if storage.is_remote(path):
            if not storage.exists(str(path)):
                raise FileNotFoundError(path)
            return json.loads(storage.read_bytes(str(path)).decode("utf-8"))
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: {missing}") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: {invalid} ({exc})") from None


def resolve_shard_dir(uri: str | Path) -> Path | str:
    """A local directory from a path or a `file://` URI; an object storage URI
    (`s3://bucket/prefix`, see `cnnflow.storage`) as it is; other schemes are refused."""
    text = str(uri)
    if "://" not in text:
        return Path(text)
    if storage.is_remote(text):
        return text.rstrip("/")
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme != "file":
        raise ShardError(
            f"{text}: unsupported URI scheme {parsed.scheme!r}; "
            f"use a local path, file:// or one of {', '.join(storage.REMOTE_SCHEMES)}"
        )
    host = "" if parsed.netloc in ("", "localhost") else parsed.netloc
    return Path(host + urllib.parse.unquote(parsed.path))


def manifest_sha256(shard_dir: str | Path) -> str:
    """sha256 of the shard set's manifest.json: it names every shard's own sha256, so this
    one digest pins the exact bytes a run trained or was scored on."""
    import hashlib

    path = storage.join(resolve_shard_dir(shard_dir), MANIFEST)
    if storage.is_remote(path):
        return hashlib.sha256(storage.read_bytes(path)).hexdigest()
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ShardError(f"{path}: cannot read the manifest ({exc.strerror})") from None


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check `manifest.json`; ShardError naming the file otherwise."""
    path = storage.join(resolve_shard_dir(shard_dir), MANIFEST)
    manifest = read_json(path, "manifest not found; run `cnnflow shard` first",
                         "not a valid manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardError(f"{path}: invalid manifest: {problem}")
    return manifest


read_manifest = load_manifest  # the name the stages, trainer, evaluate and tracker import


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


def _remote_digest(uri: str, size: int) -> tuple[str, bytes | None]:
    """sha256 of an object (and its bytes when small), read in 64 MiB ranges."""
    if size <= _IN_MEMORY_BYTES:
        data = storage.read_bytes(uri)
        return hashlib.sha256(data).hexdigest(), data
    digest = hashlib.sha256()
    for start in range(0, size, 64 << 20):
        digest.update(storage.read_bytes(uri, start, min(size, start + (64 << 20))))
    return digest.hexdigest(), None


def _remote_count(uri: str, size: int, data: bytes | None) -> int:
    if data is not None:
        return count_samples(uri, data=data)
    members = _walk(uri, size, lambda at, n: storage.read_bytes(uri, at, min(size, at + n)),
                    0, False)
    return len({n.rpartition("/")[0] + "/" + n.rpartition("/")[2].split(".", 1)[0]
                for n, _, _, _ in members})


def _verify_shard(path: Path | str, entry: dict[str, Any],
                  sizes: dict[str, int] | None = None) -> None:
    """One shard against its manifest entry; `sizes` (object name -> size) for an object
    storage prefix, listed once for the whole set."""
    remote = sizes is not None
    if (entry["name"] not in sizes) if remote else not path.is_file():
        raise ShardError(f"{path}: shard listed in the manifest is missing")
    size = sizes[entry["name"]] if remote else path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(
            f"{path}: size {size} bytes does not match the manifest "
            f"(expected {entry['bytes']}; truncated or rewritten?)"
        )
    if remote:
        digest, data = _remote_digest(path, size)
    else:
        digest, data = _sha256(path, keep=size <= _IN_MEMORY_BYTES)
    if digest != entry["sha256"]:
        raise ShardError(
            f"{path}: sha256 {digest[:12]}… does not match the manifest "
            f"(expected {entry['sha256'][:12]}…)"
        )
    samples = _remote_count(path, size, data) if remote else count_samples(path, data=data)
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
    Logs the cost of each split once (on global rank 0 of a distributed run).
    An object storage prefix is listed once for the sizes and each shard read once.
    """
    root = resolve_shard_dir(shard_dir_or_uri)
    manifest = load_manifest(root)
    sizes = storage.list_sizes(root) if storage.is_remote(root) else None
    wanted = list(manifest["splits"]) if splits is None else list(splits)
    for split in wanted:
        if split not in manifest["splits"]:
            raise ShardError(
                f"{storage.join(root, MANIFEST)}: no split {split!r}; "
                f"has {', '.join(manifest['splits']) or 'none'}"
            )
        start, entries = time.perf_counter(), manifest["splits"][split]["shards"]
        for entry in entries:
            _verify_shard(storage.join(root, entry["name"]), entry, sizes)
        if os.environ.get("RANK", "0") == "0":
            size = sum(e["bytes"] for e in entries) / 1e6
            log.info("verified %d shards of split %s (%.1f MB) in %.2f s", len(entries),
                     split, size, time.perf_counter() - start)
    return manifest
