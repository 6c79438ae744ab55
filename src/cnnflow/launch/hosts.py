"""Place the replicas of a local job on "hosts": the replica's process runs behind an argv
prefix that enters the host, and the pod addresses the operator would give (the Master's
Service, the rendezvous endpoint, status.podIP) become the hosts' addresses.

    hosts = {"master-0": Host("10.213.0.1", ("ip", "netns", "exec", "ns0")),
             "worker-0": Host("10.213.0.2", ("ip", "netns", "exec", "ns1"))}
    LocalJob("job.yaml", hosts=hosts).run()

Keys are replica labels (`master-0`, `worker-<i>`); a replica without an entry runs
here at 127.0.0.1. With network namespaces joined by a veth pair or a bridge, the
rendezvous and gloo traffic crosses a real link, which a test can cut.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cnnflow.launch.validate import ManifestError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Host:
    """Where one replica runs: its pod's address and the argv prefix that enters it."""

    addr: str
    prefix: tuple[str, ...] = ()


def addr_of(hosts: Mapping[str, Host], label: str) -> str:
    host = hosts.get(label)
    return host.addr if host else LOOPBACK


def placed_env(env: Mapping[str, str], hosts: Mapping[str, Host],
               master: str = "master-0") -> dict[str, str]:
    """The operator's pod env with its addresses on the hosts: MASTER_ADDR and
    PET_MASTER_ADDR name `master`'s (a TrainJob's: node-0), PET_RDZV_ENDPOINT worker-0's
    (the operator points it at the `<job>-worker-0` Service for elastic jobs, which have
    no Master)."""
    out = dict(env)
    for key in ("MASTER_ADDR", "PET_MASTER_ADDR"):
        if key in out:
            out[key] = addr_of(hosts, master)
    if "PET_RDZV_ENDPOINT" in out:
        port = out["PET_RDZV_ENDPOINT"].rsplit(":", 1)[1]
        out["PET_RDZV_ENDPOINT"] = f"{addr_of(hosts, 'worker-0')}:{port}"
    return out


def check_hosts(hosts: Mapping[str, Host], labels: list[str], job: str) -> None:
    """Every key of `hosts` names a replica of the job."""
    unknown = sorted(set(hosts) - set(labels))
    if unknown:
        raise ManifestError(f"PyTorchJob {job}: hosts for {', '.join(unknown)}: no such "
                            f"replica (expected labels among {', '.join(labels)})")
