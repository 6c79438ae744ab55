"""Progress reporting: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("cnnflow")


def setup_logging() -> None:
    """cnnflow's own log lines to stderr at $CNNFLOW_LOG_LEVEL (default INFO). Other
    libraries keep Python's default (warnings and errors only): their INFO lines, e.g.
    kfp.local's, are not ours to show."""
    level = os.environ.get("CNNFLOW_LOG_LEVEL", "INFO").upper()
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
        log.addHandler(handler)
    log.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    log.propagate = False


class _Lines:
    """Logs `description: done/total` at most every `interval` seconds, and at the end."""

    def __init__(self, description: str, total: int, interval: float = 5.0) -> None:
        self.description, self.total, self.interval = description, total, interval
        self.done = 0
        self._last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("%s: %d/%d", self.description, self.done, self.total)

    def close(self) -> None:
        log.info("%s: %d/%d done", self.description, self.done, self.total)


class _Bar:
    def __init__(self, progress, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


@contextmanager
def progress(description: str, total: int, enabled: bool | None = None) -> Iterator:
    """Yield an object with `.advance(n)`.

    `enabled=None` shows a bar only when stdout is a terminal, so logs in CI, DVC, KFP
    and PyTorchJob pods stay plain lines.
    """
    if enabled is None:
        enabled = sys.stdout.isatty()
    if not enabled:
        lines = _Lines(description, total)
        yield lines
        lines.close()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        yield _Bar(bar, bar.add_task(description, total=total))
