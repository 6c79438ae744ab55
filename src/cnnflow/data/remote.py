"""Shards in object storage, for the loader: a listing check, and a bounded local cache.

    check_listing("s3://b/shards", manifest["splits"]["train"]["shards"])  # sizes
    remote = RemoteShards(uris, entries)
    path = remote.local(3)      # shard 3 fetched (once), sha256-checked, as a local file

A rank's shards for an epoch are fetched concurrently by the loader (unless the cache is
bounded), each in one GET (`cnnflow.storage.read_bytes`: bounded retries with
backoff), checked against its manifest entry, and stored under its sha256 in
`CNNFLOW_STORAGE_CACHE_DIR`/shards (default: a per-user temp directory), written to a
temporary name and renamed, so DataLoader workers and later runs share it safely and a
changed object can never be served from the cache. `CNNFLOW_STORAGE_CACHE_BYTES` (default
0: unbounded) bounds the cache: the least recently used shards are removed first (an
open file stays readable to whoever holds it).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

from cnnflow import storage
from cnnflow.errors import ShardError


def check_listing(root: str, entries: list[dict[str, Any]]) -> None:
    """Every shard of `entries` is under `root` with the manifest's size (one listing)."""
    sizes = storage.list_sizes(root)
    for entry in entries:
        uri = storage.join(root, entry["name"])
        if entry["name"] not in sizes:
            raise ShardError(f"{uri}: shard listed in the manifest is missing")
        if sizes[entry["name"]] != entry["bytes"]:
            raise ShardError(
                f"{uri}: size {sizes[entry['name']]} bytes does not match the manifest "
                f"(expected {entry['bytes']}; changed after the manifest was written?)")


FETCH_THREADS = 8  # concurrent shard GETs (and indexing) when a rank starts an epoch


def cache_bytes() -> int:
    return int(os.environ.get("CNNFLOW_STORAGE_CACHE_BYTES", "0"))


class RemoteShards:
    """Local copies of one split's shards, fetched on first use (picklable: workers
    fetch through the same cache directory)."""

    def __init__(self, uris: list[str], entries: list[dict[str, Any]]) -> None:
        self.uris = uris
        self.entries = [{"bytes": e["bytes"], "sha256": e["sha256"]} for e in entries]
        self.dir = storage.cache_root() / "shards"

    def local(self, shard: int) -> str:
        entry = self.entries[shard]
        path = self.dir / f"{entry['sha256']}.tar"
        try:  # mark as most recently used (atime; mtime keys the loader's index cache)
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
            return str(path)
        except FileNotFoundError:
            pass
        uri = self.uris[shard]
        data = storage.read_bytes(uri)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry["bytes"] or digest != entry["sha256"]:
            raise ShardError(
                f"{uri}: {len(data)} bytes, sha256 {digest[:12]}… do not match the manifest "
                f"({entry['bytes']} bytes, {entry['sha256'][:12]}…): changed after the "
                "manifest was written; re-run `cnnflow shard`")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=path)
        return str(path)

    def _evict(self, keep: Path) -> None:
        limit = cache_bytes()
        if limit <= 0:
            return
        files = []
        for p in self.dir.glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_atime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= limit:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size
