"""Atomic file and directory writes shared by the stages: readers see the old copy or the
whole new one, never half, and a crash leaves at most a hidden temporary behind.

    write_json(out / "metrics.json", metrics)                # sorted, indented, "\\n" at end
    atomic_write(path, lambda f: torch.save(state, f))       # any writer of a binary file
    with atomic_dir(Path("data/shards")) as tmp:             # fill tmp; swapped in on success
        ...

A file is written to a temporary sibling (same directory, so the rename cannot cross a
file system), flushed and fsynced, renamed over the target with os.replace, and then the
directory is fsynced so that the rename itself survives a power cut.

A full disk, an exceeded quota or file size limit, or an I/O error while writing is a
`StorageError`, one line naming the operation and the path ("no space left on device
while writing checkpoint runs/x/ckpt/step-00000010.pt"); the temporary is removed and
the previous file (or directory) stays as it was. `storage_reason` finds such an error
behind a library's own exception (torch.save's RuntimeError, sqlite's "disk I/O error").
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cnnflow.errors import CnnflowError

_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for the file system or its limit",
            errno.EIO: "I/O error", errno.EROFS: "read-only file system"}
_SQLITE_REASONS = {"database or disk is full": "no space left on device",
                   "disk I/O error": "I/O error"}


class StorageError(CnnflowError):
    """The storage failed under a write: full, over quota, read-only or an I/O error."""

    exit_code = 1


def storage_reason(exc: BaseException) -> str | None:
    """"no space left on device" (etc.) when `exc`, or an exception it was raised from or
    during, is a disk-full / quota / file-size / I/O error; None otherwise."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _REASONS:
            return _REASONS[exc.errno]
        text = str(exc)
        for marker, reason in _SQLITE_REASONS.items():
            if marker in text and type(exc).__name__ in ("OperationalError", "MlflowException"):
                return reason
        exc = exc.__cause__ or exc.__context__
    return None


def storage_error_line(exc: BaseException) -> str | None:
    """The one line for a disk-full or I/O error that no stage named (`storage_reason`
    while writing the file the exception names, else its first line); None otherwise."""
    reason = storage_reason(exc)
    if reason is None:
        return None
    where = getattr(exc, "filename", None)
    first = (str(exc).splitlines() or [""])[0]
    return f"{reason} while writing {where or f'an output ({first})'}"


def raise_storage(exc: BaseException, doing: str) -> None:
    """Raise StorageError "<reason> while <doing>" from a storage fault; return otherwise."""
    reason = storage_reason(exc)
    if reason is not None:
        raise StorageError(f"{reason} while {doing}") from exc


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


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *,
                 what: str = "") -> None:
    """Call `write(f)` on a temporary binary file, then put it in place of `path`.

    If `write` raises, the temporary file is removed and an existing `path` is untouched;
    a storage fault becomes a StorageError naming `what` ("checkpoint") and `path`.
    """
    path = Path(path)
    tmp = _sibling(path, ".{name}.{token}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as exc:
        raise_storage(exc, f"writing {what + ' ' if what else ''}{path}")
        raise
    finally:
        tmp.unlink(missing_ok=True)


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
def atomic_dir(out: Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """An empty temporary sibling of `out` to fill; swapped in for `out` when the block
    ends normally, removed (leaving `out` as it was) when it raises. The entries `keep`
    names (an MLflow spool written meanwhile) move from the old `out` into the new one."""
    tmp = _sibling(out, ".{name}.tmp-{token}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        _swap_keeping(tmp, out, keep)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_storage(exc, f"writing {out} (left as it was)")
        raise


def _swap_keeping(tmp: Path, out: Path, keep: tuple[str, ...]) -> None:
    moved = [name for name in keep if (out / name).exists() and not (tmp / name).exists()]
    for name in moved:
        os.replace(out / name, tmp / name)
    try:
        swap_in_dir(tmp, out)
    except BaseException:
        for name in moved:  # the old copy is back in place: so are these
            os.replace(tmp / name, out / name)
        raise
