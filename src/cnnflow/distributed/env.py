"""Detect how this process was launched and join the process group.

One entrypoint serves every launch:
- one process: no RANK/WORLD_SIZE in the environment -> world of 1, no process group;
- `torchrun --nproc_per_node=N`: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT set per worker (PET_* variables configure torchrun itself);
- a PyTorchJob pod running plain python: the operator sets MASTER_ADDR, MASTER_PORT,
  WORLD_SIZE and RANK (= pod index); LOCAL_RANK is absent, so it is 0 with one process
  per pod.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cnnflow.errors import CnnflowError

log = logging.getLogger("cnnflow")


class DistributedInitError(CnnflowError):
    """The process group could not be formed (master unreachable, ranks missing)."""


class LostContactError(CnnflowError):
    """A collective failed: a peer stopped answering (link down, host gone) for the
    process group's timeout, or closed its connection. Exit code 138 (128 + SIGUSR1),
    the code the Training Operator reserves for user-defined retryable failures: a lost
    link is transient, so restartPolicy ExitCode restarts the pod and it resumes."""

    exit_code = 138


# What gloo's TCP transport says when a peer is silent for the timeout or goes away.
_GLOO_LOST = re.compile(r"Timed out waiting \d+ms for \w+ operation|Connection (reset|closed) "
                        r"by peer|Read error|Write error|Connection refused|No route to host")
# Each rank's address as the others reach it, exchanged when the group forms.
_ADDRESSES: dict[int, str] = {}


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = "gloo"
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only process that writes outputs and logs to trackers."""
        return self.rank == 0


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedInitError(f"environment {name}={raw!r}: expected an integer") from None


def read_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from the launcher's variables."""
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", 0)
    local_world = _int_env("LOCAL_WORLD_SIZE", 1 if "LOCAL_RANK" not in os.environ else world)
    if world < 1 or not 0 <= rank < world:
        raise DistributedInitError(
            f"environment RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE"
        )
    return rank, world, local_rank, max(1, local_world)


def pick_backend(requested: str) -> tuple[str, torch.device, int]:
    """(backend, device, local_rank-based device index) for `parallel.backend`."""
    cuda = torch.cuda.is_available()
    if requested == "nccl" and not cuda:
        raise DistributedInitError(
            "parallel.backend='nccl': needs CUDA, which this machine lacks; use 'gloo' or 'auto'"
        )
    if requested == "auto":
        requested = "nccl" if cuda else "gloo"
    return requested, torch.device("cuda" if requested == "nccl" else "cpu"), 0


def set_threads(local_world_size: int, threads: int = 0) -> int:
    """Intra-op threads = available cores / local processes (or `threads` when > 0)."""
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1
        )
        threads = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def init_distributed(backend: str = "auto", timeout_s: float = 60.0, threads: int = 0) -> DistEnv:
    """Join the process group described by the environment; a world of 1 joins nothing.

    An unreachable MASTER_ADDR or a rank that never arrives fails after `timeout_s`
    with a one-line error, instead of hanging the job.
    """
    rank, world, local_rank, local_world = read_env()
    name, device, _ = pick_backend(backend)
    set_threads(local_world, threads)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    env = DistEnv(rank, world, local_rank, local_world, name, device)
    if world == 1 or dist.is_initialized():
        return env
    addr = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise DistributedInitError(
            f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: launch with "
            "torchrun or set both"
        )
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        # The TCPStore connect honours `timeout`: an unreachable master raises after it.
        store = _store(addr, int(port), rank, world, timeout)
        dist.init_process_group(name, store=store, rank=rank, world_size=world,
                                timeout=timeout)
        _exchange_addresses(store, rank, world, addr, int(port))
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DistributedInitError(
            f"could not form the process group at MASTER_ADDR={addr} MASTER_PORT={port} "
            f"(rank {rank} of {world}) within parallel.init_timeout_s={timeout_s:g}s: {first}"
        ) from None
    log.info("rank %d/%d joined %s group (local %d/%d)", rank, world, name, local_rank,
             local_world)
    return env


def _exchange_addresses(store: dist.Store, rank: int, world: int, addr: str,
                        port: int) -> None:
    """Record every rank's address (the one its traffic to the master leaves from), for
    naming the peer a collective lost (`lost_contact`)."""
    try:
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:  # sends nothing
            probe.connect((addr, port))
            mine = probe.getsockname()[0]
    except OSError:
        mine = "?"
    store.set(f"addr/{rank}", mine)
    _ADDRESSES.clear()
    _ADDRESSES.update({r: store.get(f"addr/{r}").decode() for r in range(world)})


def lost_contact(exc: BaseException, env: DistEnv, timeout_s: float
                 ) -> LostContactError | None:
    """One line for a collective that failed because a peer went silent or away (gloo's
    transport errors); None for any other error, which stays what it is."""
    text = str(exc)
    found = _GLOO_LOST.search(text)
    if not env.distributed or found is None:
        return None
    peers = [r for r in range(env.world_size) if r != env.rank]
    who = ", ".join(f"rank {r} ({_ADDRESSES.get(r, '?')})" for r in peers[:4])
    who += f" and {len(peers) - 4} more" if len(peers) > 4 else ""
    what = (f"for {timeout_s:g} s" if found.group(0).startswith("Timed out")
            else f"({found.group(0).lower()})")
    return LostContactError(
        f"rank {env.rank} ({_ADDRESSES.get(env.rank, '?')}) lost contact with {who} {what} "
        f"during a collective; check the network between the nodes (the limit is "
        f"parallel.init_timeout_s={timeout_s:g})")


def _store(addr: str, port: int, rank: int, world: int,
           timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this (re)start of the worker group.

    Under torchrun the agent hosts the store and keeps it across `--max-restarts`: a
    restarted group that used the bare store would read the killed workers' gloo
    addresses and wait on them forever. Plain python in a PyTorchJob pod: rank 0 hosts it.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, world_size=world, is_master=not agent and rank == 0,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"cnnflow/attempt-{attempt}", store)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
