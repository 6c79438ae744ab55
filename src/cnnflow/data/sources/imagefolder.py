"""An image folder: root/<class>/<image>.png|jpg|jpeg, any size.

Classes are the sorted names of root's subfolders; files in root itself and hidden
entries (names starting with ".") are ignored; class folders are searched recursively.
Images are ordered by their sorted relative path, converted to "L" (channels=1) or
"RGB" (channels=3; alpha is dropped, palettes expanded), then resized to height x width
with PIL's BILINEAR filter (which antialiases when shrinking) if their size differs.

Decoding happens before the split (a skipped file changes the labels the split needs),
into a memmap in prepare's scratch directory, by `workers` processes.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cnnflow.config import PrepareConfig
from cnnflow.data.sources.base import SourceData, chunk_rows, resolved_shape, split_params
from cnnflow.errors import DataError
from cnnflow.progress import progress

log = logging.getLogger("cnnflow")

EXTENSIONS = (".png", ".jpg", ".jpeg")
DECODE_BATCH = 64
"""Files per pool task: enough to amortise the task round trip, small for even load."""


def open_imagefolder(cfg: PrepareConfig, scratch: Path, show_progress: bool | None) -> SourceData:
    root = Path(cfg.path)
    shape = resolved_shape(cfg)
    classes, files, file_labels = scan(root)
    decoded = np.lib.format.open_memmap(
        scratch / "decoded.npy", mode="w+", dtype=np.uint8, shape=(len(files), *shape)
    )
    failures = _decode_all(root, files, decoded, shape, cfg.workers, show_progress)
    ok = np.ones(len(files), dtype=bool)
    for i, reason in failures:
        if not cfg.skip_corrupt:
            raise DataError(f"{root / files[i]}: {reason} (prepare.skip_corrupt=true skips it)")
        ok[i] = False
    skipped = [files[i] for i, _ in failures]
    if skipped:
        log.warning("imagefolder %s: skipped %d unreadable file(s)", root, len(skipped))
    labels = file_labels[ok]
    counts = np.bincount(labels, minlength=len(classes))
    for k, name in enumerate(classes):
        if counts[k] == 0:
            raise DataError(f"{root / name}: class folder holds no readable images")
    decoded.flush()
    return SourceData(
        classes=classes,
        labels=labels,
        image_shape=shape,
        read_chunks=lambda: _kept_chunks(decoded, ok),
        params={
            "source": "imagefolder",
            "path": cfg.path,
            **split_params(cfg),
            "height": shape[0],
            "width": shape[1],
            "channels": shape[2],
            "skip_corrupt": cfg.skip_corrupt,
        },
        extra={"skipped": skipped},
    )


def scan(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Class names, relative posix paths of every visible file (sorted), their labels."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; expected root/<class>/<image>.png")
    files: list[str] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        found = sorted(
            p.relative_to(root).as_posix()
            for p in (root / name).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not found:
            raise DataError(f"{root / name}: empty class folder; expected .png/.jpg/.jpeg images")
        files += found
        labels += [k] * len(found)
    order = sorted(range(len(files)), key=files.__getitem__)
    return classes, [files[i] for i in order], np.asarray(labels, dtype=np.int64)[order]


def _decode_all(
    root: Path,
    files: list[str],
    out: np.ndarray,
    shape: tuple[int, int, int],
    workers: int,
    show_progress: bool | None,
) -> list[tuple[int, str]]:
    """Decode every file into `out`; return (index, reason) for the ones that failed."""
    tasks = [
        (str(root), start, files[start : start + DECODE_BATCH], shape)
        for start in range(0, len(files), DECODE_BATCH)
    ]
    failures: list[tuple[int, str]] = []
    with progress("decoding images", len(files), enabled=show_progress) as bar:
        if workers <= 1 or len(tasks) == 1:
            results: Iterator = map(decode_batch, tasks)
            _collect(results, out, failures, bar)
        else:
            with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
                _collect(pool.imap(decode_batch, tasks), out, failures, bar)
    return failures


def _collect(results: Iterator, out: np.ndarray, failures: list, bar) -> None:
    for start, images, problems in results:
        out[start : start + len(images)] = images
        failures += problems
        bar.advance(len(images))


def decode_batch(task: tuple) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    """Decode files[start:...] (a pool task); failures are returned, never raised."""
    root, start, names, (height, width, channels) = task
    images = np.zeros((len(names), height, width, channels), dtype=np.uint8)
    problems = []
    for i, name in enumerate(names):
        try:
            images[i] = load_image(Path(root) / name, height, width, channels)
        except _NotAnImage as exc:
            problems.append((start + i, str(exc)))
    return start, images, problems


class _NotAnImage(Exception):
    pass


def load_image(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """One file as uint8 (height, width, channels), or _NotAnImage saying why not."""
    from PIL import Image

    if path.suffix.lower() not in EXTENSIONS:
        raise _NotAnImage(f"not an image file; expected {', '.join(EXTENSIONS)}")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)
    except Exception as exc:  # PIL raises many types for bad files; all mean "unreadable"
        raise _NotAnImage(f"corrupt or truncated image ({type(exc).__name__})") from None


def _kept_chunks(decoded: np.ndarray, ok: np.ndarray) -> Iterator[np.ndarray]:
    rows = chunk_rows(decoded.shape[1:])
    for start in range(0, len(decoded), rows):
        yield np.ascontiguousarray(decoded[start : start + rows][ok[start : start + rows]])
