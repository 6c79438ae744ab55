"""`train.profile_steps`: a torch profiler over a few steps, a Chrome trace per rank.

Every rank writes its own `traces/rank{N}.json` under train.out_dir: communication waits
differ per rank, which is what the traces are for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cnnflow.config import TrainConfig
from cnnflow.distributed.env import DistEnv

log = logging.getLogger("cnnflow")


def start_profiler(tc: TrainConfig, env: DistEnv):
    """A started profiler (call `.step()` per optimizer step, `.stop()` at the end), or
    None when `train.profile_steps` is 0."""
    if not tc.profile_steps:
        return None
    trace_dir = Path(tc.out_dir) / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)

    def ready(prof):
        path = trace_dir / f"rank{env.rank}.json"
        prof.export_chrome_trace(str(path))
        log.info("rank %d: wrote profiler trace %s", env.rank, path)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if env.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=tc.profile_wait, warmup=1,
                                         active=tc.profile_steps, repeat=1),
        on_trace_ready=ready,
    )
    prof.start()
    return prof
