"""Helpers for tests that run real training processes.

Run as a module (`torchrun ... -m tests.distributed.harness --params FILE`, which is what
`run_torchrun(..., probe=DIR)` does), this file is `cnnflow.train` with a communication
probe installed in each worker: see `install_comm_probe`.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from cnnflow.config import load_params, to_dict

ROOT = Path(__file__).resolve().parents[2]
PROBE_ENV = "CNNFLOW_TEST_COMM_PROBE"


def write_params(path: Path, shards: Path, work: Path, overrides: list[str]) -> Path:
    """A params.yaml for a run in `work` on `shards`, with `overrides` applied. No dropout
    and no label smoothing unless `overrides` ask: the digits defaults' regularisation is
    tuned for 60 epochs, and per-rank dropout masks differ with the world size."""
    base = [f"train.shards={shards}", f"train.out_dir={work / 'out'}",
            f"checkpoint.dir={work / 'ckpt'}", "train.log_every=1", "tracking.enabled=false",
            "model.dropout=0", "optim.label_smoothing=0"]
    params = load_params(None, base + overrides)
    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return path


def run_torchrun(nproc: int, params: Path, *, extra: list[str] = (), timeout: float = 240,
                 env: dict | None = None, probe: Path | None = None
                 ) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m cnnflow.train --params FILE`; with
    `probe`, each worker records its communication under that directory (see
    `install_comm_probe`, `read_probe`)."""
    module = "cnnflow.train"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if probe is not None:
        probe.mkdir(parents=True, exist_ok=True)
        module, full_env[PROBE_ENV] = "tests.distributed.harness", str(probe)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *extra, "-m", module, "--params", str(params)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_probe(probe: Path, rank: int) -> dict[str, list[dict]]:
    """One worker's probe records, by event kind ("wrap", "hook", "all_reduce", "average")."""
    events: dict[str, list[dict]] = {"wrap": [], "hook": [], "all_reduce": [], "average": []}
    for event in read_jsonl(probe / f"rank{rank}.jsonl"):
        events[event.pop("ev")].append(event)
    return events


def install_comm_probe(out_dir: Path) -> None:
    """Record what this worker sends over the wire, as JSON lines in out_dir/rank{RANK}.jsonl:

    - `wrap`: `wrap_ddp` was called; `params`, the elements of the model's parameters;
    - `hook`: the DDP communication hook chosen by `parallel.comm_hook` ran on a bucket;
      `name` (the torch hook function), `numel` (bucket elements), `iter` (PowerSGD's
      iteration counter before the call, else null);
    - `all_reduce`: a `torch.distributed.all_reduce`; `dtype`, `numel`, `source` ("hook"
      when issued by the comm hook itself, "average" when by local SGD's parameter
      averaging, else null) and `tag` ("p"/"q" for PowerSGD's low-rank factors);
    - `average`: `average_parameters` (local SGD) ran; `step`, its caller's step.

    Only observes: every call goes on to the real function with the same arguments.
    """
    import torch.distributed as dist

    from cnnflow.distributed import ddp

    path = out_dir / f"rank{os.environ['RANK']}.jsonl"
    lock = threading.Lock()
    local = threading.local()  # the synchronous part of a hook or average on this thread
    powersgd_states: list = []

    def record(**event) -> None:
        with lock, path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    real_all_reduce, real_hook = dist.all_reduce, ddp._hook
    real_wrap, real_average = ddp.wrap_ddp, ddp.average_parameters

    def all_reduce(tensor, *args, **kwargs):
        tag = None
        for state in powersgd_states:
            for name in ("p", "q"):
                if any(tensor is t for t in getattr(state, f"{name}_memory_dict").values()):
                    tag = name
        record(ev="all_reduce", dtype=str(tensor.dtype).removeprefix("torch."),
               numel=tensor.numel(), source=getattr(local, "source", None), tag=tag)
        return real_all_reduce(tensor, *args, **kwargs)

    def _hook(cfg):
        state, hook = real_hook(cfg)
        if hasattr(state, "p_memory_dict"):
            powersgd_states.append(state)

        def observed(hook_state, bucket):
            record(ev="hook", name=hook.__name__, numel=bucket.buffer().numel(),
                   iter=getattr(hook_state, "iter", None))
            local.source = "hook"
            try:
                return hook(hook_state, bucket)
            finally:
                local.source = None

        return state, observed

    def wrap_ddp(model, env, cfg):
        record(ev="wrap", params=sum(p.numel() for p in model.parameters()))
        return real_wrap(model, env, cfg)

    def average_parameters(model, world_size):
        record(ev="average", step=sys._getframe(1).f_locals.get("step"))
        local.source = "average"
        try:
            return real_average(model, world_size)
        finally:
            local.source = None

    dist.all_reduce, ddp._hook = all_reduce, _hook
    ddp.wrap_ddp, ddp.average_parameters = wrap_ddp, average_parameters


if __name__ == "__main__":
    install_comm_probe(Path(os.environ[PROBE_ENV]))
    runpy.run_module("cnnflow.train", run_name="__main__", alter_sys=True)
