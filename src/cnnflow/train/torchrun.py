"""torchrun whose exit code says "preempted, retry me".

    python -m cnnflow.train.torchrun --nproc-per-node=2 -m cnnflow.train --params FILE

Same options and behaviour as `torchrun` (it runs torch.distributed.run's own parser and
`run`); only the way it ends differs. torchrun forwards SIGTERM/SIGINT to its workers,
waits for them (--shutdown-timeout, 30 s by default) and then raises SignalException:
exit code 1 and a traceback, which the Training Operator's restartPolicy ExitCode treats
as a permanent failure. The workers meanwhile finish their step and checkpoint
(`cnnflow.train.preempt`). Here:

- the agent got SIGTERM/SIGINT: exit 128 + the signal (143/130, retryable), one line;
- workers failed: when every failure is a signal exit (128 + n, or killed by signal n;
  a preempted worker exits 143), that code, else the first failed rank's code; one line
  naming the ranks and their codes (the workers have printed their own errors).

The rendered PyTorchJob runs this as its torchrun (`cnnflow.launch.pytorchjob`).
"""

from __future__ import annotations

import signal
import sys


def _code(exitcode: int) -> int:
    """A worker's exit as a container exit code: killed by signal n -> 128 + n."""
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        code = 128 + int(exc.sigval)
        print(f"cnnflow: torchrun: stopped by {name}; exit {code}", file=sys.stderr,
              flush=True)
        return code
    except ChildFailedError as exc:
        codes = {rank: _code(f.exitcode) for rank, f in sorted(exc.failures.items())}
        first = _code(exc.get_first_failure()[1].exitcode)
        code = max(codes.values()) if all(c >= 128 for c in codes.values()) else first
        what = ", ".join(f"rank {rank} exit {c}" for rank, c in codes.items())
        print(f"cnnflow: torchrun: workers failed ({what}); exit {code}", file=sys.stderr,
              flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
