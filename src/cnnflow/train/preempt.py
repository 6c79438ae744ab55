"""Preemption is a normal event: SIGTERM or SIGINT finishes the step, checkpoints, exits.

    stop = StopSignal(budget_s=params.checkpoint.preempt_budget_s)
    with stop.installed():          # SIGTERM / SIGINT now only record the request
        ... every step, on every rank: if stop.agreed(distributed): save, raise Preempted

Kubernetes sends SIGTERM on eviction or preemption and SIGKILL after the pod's
terminationGracePeriodSeconds (30 s by default). The signal may reach one process (the
container's PID 1: `python -m cnnflow.train`, or the torchrun agent, which forwards it
to its workers) or only some ranks, so the ranks agree on the step to stop at: after
every optimizer step each rank all-reduces (MAX) its stop flag, one int on the wire.
All ranks then write the checkpoint of that step together (a collective: a rank that
stopped alone would leave the others waiting in it), rank 0 logs
`preempted at step N, checkpoint PATH` once, and every rank exits with `Preempted`.

The exit code is 128 + the signal, what a process killed by that signal reports: 143
for SIGTERM, 130 for SIGINT. Those are the codes the Training Operator (kubeflow.org/v1,
pkg/util/train IsRetryableExitCode) retries under restartPolicy ExitCode: 130, 137
(SIGKILL), 138 (SIGUSR1, "user-defined retryable") and 143 are retryable, while 1, 2,
126-128, 139 and every other code are permanent failures. Trainer v2 (JobSet, Job
podFailurePolicy) is configured by exit code in the same way. A preempted pod is thus
restarted and resumes from the checkpoint with no step lost; exit code 1 (torchrun's
own on a signal, hence `cnnflow.train.torchrun`) would fail the job.

If the step and the checkpoint take longer than `budget_s` after the first signal, the
process logs one line and exits with the same code; the last complete checkpoint is
intact (checkpoints are atomic). A second SIGINT stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("cnnflow")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """128 + the signal number: retryable for the operators (see the module docstring)."""
    return 128 + int(signum)


class Preempted(SystemExit):
    """Raised on every rank once the stop checkpoint is written; exits with 128 + signal.
    A SystemExit, so that `except Exception` handlers do not turn it into an error."""

    def __init__(self, signum: int, step: int, path: str | None) -> None:
        super().__init__(exit_code(signum))
        self.signum, self.step, self.path = signum, step, path


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying; `agreed` tells every rank to stop."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.signum = 0
        self.step = 0  # the last finished step, for the budget's message
        self.latest: Callable[[], object] = lambda: None  # the newest checkpoint's path
        self._timer: threading.Timer | None = None

    @contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """Handle the signals for the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self._timer is not None:
                self._timer.cancel()

    def _handler(self, signum: int, frame) -> None:
        if self.signum:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return
        self.signum = signum
        self._timer = threading.Timer(self.budget_s, self._budget_spent)
        self._timer.daemon = True
        self._timer.start()

    def _budget_spent(self) -> None:
        log.error("checkpoint.preempt_budget_s=%gs spent after %s at step %d before a "
                  "checkpoint was written; the last complete checkpoint %s is intact",
                  self.budget_s, signal.Signals(self.signum).name, self.step,
                  self.latest() or "(none)")
        logging.shutdown()
        os._exit(exit_code(self.signum))

    def agreed(self, distributed: bool) -> int:
        """The signal any rank got (0: none); collective when `distributed`."""
        if not distributed:
            return self.signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
