"""Which directories a stage may write into: its own, or an empty one.

    out = claim_output("shard", "shard.out_dir", "data/shards",
                       inputs={"prepare.out_dir": "data/prepared"})   # checks, writes nothing
    mark_output("shard", tmp)                                          # the marker, once written

A stage writes only into a directory that is absent or empty, or that it made itself:
one holding the marker file `.cnnflow-owner.json` (`{"stage": "shard", "version": ...}`)
of the same stage. A directory from an older cnnflow without a marker is accepted when
every entry in it is one this stage writes, by name (`manifest.json` and
`<split>-NNNNNN.tar` for shard). Anything else is refused before the stage writes
anything, with one line naming the path and what is in it:

    shard.out_dir data/prepared holds files cnnflow did not write (notes/, 3 more);
    choose an empty directory

Also refused: an empty path, the file system root, the working directory or a directory
holding it (the repository root included), and an output that contains or lies inside
one of the stage's inputs. Stages that replace their directory whole (prepare, shard)
refuse unknown entries even in a marked directory, since the swap would delete them;
stages that write in place (train, checkpoint, evaluate) add to a marked directory and
leave other entries alone.

Paths are strings (a `file://` URI is read as its path). An object storage prefix
(`s3://...`) is left to its writer, which publishes last and refuses what it did not
write there: shard (another dataset version, foreign objects), checkpoints and the model
(complete only with their `.done`/`_SUCCESS` markers); see cnnflow.storage.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cnnflow.errors import CnnflowError
from cnnflow.storage import is_remote

MARKER = ".cnnflow-owner.json"
SPOOL = "mlflow-spool"
"""The tracker's default spool inside a stage's out_dir (kept across a replace)."""
_COMMON = (re.escape(MARKER), re.escape(SPOOL), r"\..+\.tmp")  # + atomic_write leftovers
_SPLIT = r"(train|val|test)"
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "prepare": (r"dataset\.json", _SPLIT + r"_(images|labels)\.npy", r"\.scratch"),
    "shard": (r"manifest\.json", _SPLIT + r"-\d{6}\.tar"),
    "train": (r"model\.pt", r"model\.json", r"metrics\.jsonl", r"steps\.jsonl",
              r"summary\.json", r"mlflow\.json", r"traces"),
    "checkpoint": (r"step-\d{8}(\.pt)?", r"\.step-\d{8}\.tmp", r"progress"),
    "evaluate": (r"metrics\.json", r"evaluation\.json", r"per_class\.json", r"plots"),
}
REPLACES = ("prepare", "shard")
"""Stages that swap in a whole new directory (fileio.atomic_dir)."""


class OutputError(CnnflowError):
    """An output directory the stage does not own, or one that overlaps its input."""


def _local(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    return text[len("file://"):] if text.startswith("file://") else text


def _owns(stage: str, name: str, holds: tuple[str, ...] = ()) -> bool:
    patterns = (*STAGE_FILES[stage], *_COMMON)
    return name in holds or any(re.fullmatch(p, name) for p in patterns)


def read_marker(directory: Path) -> dict | None:
    """The marker's content, None without one; a malformed marker is an OutputError."""
    path = directory / MARKER
    if not path.is_file():
        return None
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: unreadable ownership marker ({exc}); remove it or "
                          "choose an empty directory") from None
    if not isinstance(owner, dict) or not isinstance(owner.get("stage"), str):
        raise OutputError(f"{path}: expected {{\"stage\": ..., \"version\": ...}}, got "
                          f"{owner!r}; remove it or choose an empty directory")
    return owner


def _holds_cwd(out: Path) -> str | None:
    cwd = Path.cwd().resolve()
    if out == Path(out.anchor):
        return "is the file system root"
    if out == cwd:
        return "is the working directory"
    if out in cwd.parents:
        top = next((p for p in (cwd, *cwd.parents) if (p / ".git").exists()), None)
        return ("is the repository root" if out == top
                else f"holds the working directory {cwd}")
    return None


def _overlap(key: str, raw: str, out: Path, inputs: dict[str, str], what: str) -> None:
    for name, value in inputs.items():
        if not value or "://" in value and not value.startswith("file://"):
            continue
        src = Path(_local(value)).resolve()
        where = ("is" if out == src else "holds" if out in src.parents
                 else "lies inside" if src in out.parents else "")
        if where:
            raise OutputError(f"{key} {raw} {where} {name} {value}, {what}; choose a "
                              "directory apart from it")


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:1])
    return shown + (f", {len(names) - 1} more" if len(names) > 1 else "")


def _foreign(directory: Path, stage: str, holds: tuple[str, ...]) -> list[str]:
    """Entries of `directory` that `stage` does not write (a directory as `name/`)."""
    return [entry.name + ("/" if entry.is_dir() else "")
            for entry in sorted(directory.iterdir()) if not _owns(stage, entry.name, holds)]


def _other_stage(directory: Path, stage: str) -> str | None:
    """The stage whose files (and only those) fill `directory`, other than `stage`."""
    names = [p.name for p in directory.iterdir()]
    for other in STAGE_FILES:
        if other != stage and names and all(_owns(other, n) for n in names):
            return other
    return None


def claim_output(stage: str, key: str, path: str | os.PathLike, *,
                 inputs: dict[str, str] | None = None, apart: dict[str, str] | None = None,
                 holds: tuple[str, ...] = ()) -> Path | None:
    """Check that `stage` may write `path` (the value of params key `key`); its Path
    (None for an object storage prefix).

    Raises OutputError naming the path otherwise; writes nothing. `inputs` (params key
    -> path) are what the stage reads, `apart` its other outputs; `holds` names entries
    of another output of the stage nested in this one (see `nested_name`).
    """
    raw = _local(path)
    if not raw.strip():
        raise OutputError(f"{key} is empty; expected a directory for the {stage} output")
    if is_remote(raw):
        return None
    out = Path(raw).resolve()
    where = _holds_cwd(out)
    if where:
        raise OutputError(f"{key} {raw} {where}; choose a directory of its own")
    _overlap(key, raw, out, inputs or {}, "which the stage reads")
    _overlap(key, raw, out, apart or {}, "another output of the stage")
    if not out.exists():
        return out
    if not out.is_dir():
        raise OutputError(f"{key} {raw} is a file, not a directory; choose a directory")
    if not any(out.iterdir()):
        return out
    owner = read_marker(out)
    if owner is not None and owner["stage"] != stage:
        raise OutputError(f"{key} {raw} holds the {owner['stage']} output of cnnflow "
                          f"{owner.get('version', '?')}; choose another directory")
    if owner is not None and stage not in REPLACES:
        return out
    foreign = _foreign(out, stage, holds)
    if foreign:
        other = _other_stage(out, stage) if owner is None else None
        what = (f"the {other} output of cnnflow" if other else
                f"files cnnflow did not write ({_describe(foreign)})")
        raise OutputError(f"{key} {raw} holds {what}; choose an empty directory")
    return out


def nested_name(inner: str, outer: str) -> str | None:
    """The entry of directory `outer` that `inner` lies in (`ckpt` for out/ckpt/x), or None
    when `inner` is not strictly inside `outer` (or either is empty)."""
    if not inner.strip() or not outer.strip():
        return None
    try:
        rel = Path(_local(inner)).resolve().relative_to(Path(_local(outer)).resolve())
    except ValueError:
        return None
    return rel.parts[0] if rel.parts else None


def mark_output(stage: str, directory: str | os.PathLike) -> None:
    """Write the marker of `stage` into `directory` (created if absent), unless it holds
    that marker already. An object storage prefix gets none (see claim_output)."""
    from cnnflow import __version__
    from cnnflow.fileio import write_json

    if is_remote(_local(directory)):
        return
    path, owner = Path(_local(directory)), {"stage": stage, "version": __version__}
    if not (path.is_dir() and read_marker(path) == owner):
        write_json(path / MARKER, owner)
