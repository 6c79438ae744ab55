"""Parallelism degrees -> a `DeviceMesh`, and where this rank sits in it.

    degrees = resolve_degrees(params.parallel, world_size=4)   # dp=0 takes the rest
    mesh = build_mesh(degrees, env)                              # dims ("pp", "dp", "fsdp")

Mesh order, outermost first: pp, dp, fsdp (torchtitan's order: the dimension that
communicates least goes outermost, so on several nodes the pipeline's point-to-point
sends cross nodes while FSDP's all-gathers stay inside one). Rank r has coordinates
(pp, dp, fsdp) = unravel(r, (PP, DP, FSDP)); e.g. dp=2 x pp=2 puts stage 0 on ranks 0, 1
and stage 1 on ranks 2, 3, replica 0 on ranks 0 and 2.

Data: every rank of one pipeline replica reads the same batches, so the data-parallel
world is dp x fsdp and a rank's data rank is its (dp, fsdp) coordinate, flattened.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cnnflow.config import ParallelConfig
from cnnflow.distributed.env import DistEnv
from cnnflow.errors import ConfigError

DIMS = ("pp", "dp", "fsdp")


@dataclass(frozen=True)
class Degrees:
    """Resolved degrees (dp x pp x fsdp = world size) and this rank's coordinates."""

    dp: int
    pp: int
    fsdp: int
    rank: int = 0

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.fsdp

    @property
    def coords(self) -> dict[str, int]:
        """{"pp": i, "dp": j, "fsdp": k} of this rank (row-major over DIMS)."""
        pp, rest = divmod(self.rank, self.dp * self.fsdp)
        dp, fsdp = divmod(rest, self.fsdp)
        return {"pp": pp, "dp": dp, "fsdp": fsdp}

    @property
    def data_world(self) -> int:
        """Ranks that read different batches: the replicas and the shards."""
        return self.dp * self.fsdp

    @property
    def data_rank(self) -> int:
        c = self.coords
        return c["dp"] * self.fsdp + c["fsdp"]

    @property
    def strategy(self) -> str:
        """ddp | fsdp | hsdp | pp | dp x pp: the name the plan and the tags use."""
        if self.pp > 1:
            return "pp" if self.dp == 1 else "dp x pp"
        if self.fsdp > 1:
            return "fsdp" if self.dp == 1 else "hsdp"
        return "ddp"


def resolve_degrees(cfg: ParallelConfig, world_size: int, rank: int = 0) -> Degrees:
    """The degrees for `world_size` processes; raises ConfigError naming the values."""
    fixed = cfg.pp * cfg.fsdp
    if cfg.dp == 0:
        if world_size % fixed:
            raise ConfigError(
                f"parallel.pp={cfg.pp} x parallel.fsdp={cfg.fsdp} = {fixed}: expected a "
                f"divisor of the world size {world_size} (dp=0 takes the rest)"
            )
        dp = world_size // fixed
    else:
        dp = cfg.dp
        if dp * fixed != world_size:
            raise ConfigError(
                f"parallel.dp x pp x fsdp = {dp} x {cfg.pp} x {cfg.fsdp} = {dp * fixed}: "
                f"expected the world size {world_size} (or dp=0 for the rest)"
            )
    if cfg.pp > 1 and cfg.fsdp > 1:
        raise ConfigError(
            f"parallel.fsdp={cfg.fsdp} with parallel.pp={cfg.pp}: sharding pipeline stages "
            "is not supported; expected fsdp=1 when pp > 1 (use dp for replicas)"
        )
    return Degrees(dp=dp, pp=cfg.pp, fsdp=cfg.fsdp, rank=rank)


def build_mesh(degrees: Degrees, env: DistEnv) -> DeviceMesh:
    """The 3-D mesh ("pp", "dp", "fsdp"); size-1 dimensions cost no process group calls."""
    return init_device_mesh(env.device.type, (degrees.pp, degrees.dp, degrees.fsdp),
                            mesh_dim_names=DIMS)
