"""Atomic file and directory writes shared by the stages: readers see the old copy or the
whole new one, never half, and a crash leaves at most a hidden temporary behind.

    write_json(out / "metrics.json", metrics)                # sorted, indented, "\\n" at end
    atomic_write(path, lambda f: torch.save(state, f))       # any writer of a binary file
    with atomic_dir(Path("data/shards")) as tmp:             # fill tmp; swapped in on success
        ...

A file is written to a temporary sibling (same directory, so the rename cannot cross a
file system), flushed and fsynced, renamed over the target with os.replace, and then the
directory is fsynced so that the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _sibling(path: Path, pattern: str) -> Path:
    """A hidden name next to `path`, unique to this process and call: `pattern` with
    {name} and {token} filled in."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(pattern.format(name=path.name, token=token))


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(f)` on a temporary binary file, then put it in place of `path`.

    If `write` raises, the temporary file is removed and an existing `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, ".{name}.{token}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str | Path, obj: Any) -> None:
    """Sorted, indented JSON with a final newline, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def swap_in_dir(new: Path, out: Path) -> None:
    """Replace directory `out` (if any) by `new`: a crash leaves the old or the new copy.

    The old copy is renamed aside first, since a directory cannot be renamed over a
    non-empty one; if moving `new` in fails, the old copy is put back.
    """
    old = _sibling(out, ".{name}.old-{token}")
    had_old = out.exists()
    if had_old:
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if had_old:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """An empty temporary sibling of `out` to fill; swapped in for `out` when the block
    ends normally, removed (leaving `out` as it was) when it raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, ".{name}.tmp-{token}")
    tmp.mkdir()
    try:
        yield tmp
        swap_in_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
