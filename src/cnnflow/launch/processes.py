"""Processes as pods are: signals recorded, process trees stopped as a whole.

    with recorded_signals() as caught:      # SIGTERM/SIGINT only appended to `caught`
        ...
    stop_process_trees([pid], signal.SIGTERM, grace_s=30)   # then SIGKILL what is left

`cnnflow.launch.local` runs each replica in a process group of its own; a pod's
processes all end with the pod, so stopping a replica stops its whole tree, including
children that left its group (torchrun starts its workers in sessions of their own).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def recorded_signals() -> Iterator[list[int]]:
    """SIGTERM and SIGINT only recorded (into the yielded list) for the block; in the
    main thread only (elsewhere the list stays empty)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    sigs = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in sigs}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_process_trees(pids: Iterable[int], sig: int, grace_s: float) -> None:
    """`sig` to the process groups led by `pids`; after `grace_s`, SIGKILL to every
    process of their trees still alive (collected before the signal and again before
    the kill, so that children orphaned meanwhile are not missed)."""
    import psutil

    pids = list(pids)
    tree: dict[int, psutil.Process] = {}

    def collect() -> None:
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for p in [root, *root.children(recursive=True)]:
                    tree.setdefault(p.pid, p)

    collect()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    _, alive = psutil.wait_procs(list(tree.values()), timeout=grace_s)
    collect()
    for p in {*alive, *tree.values()}:
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                p.kill()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    psutil.wait_procs(list(tree.values()), timeout=5)
