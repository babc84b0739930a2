"""The world arranged as (pp x dp x ep x tp): degrees, their validation, rank coordinates and process groups.

Rank layout (tp innermost, so a tensor-parallel group is a block of neighbouring ranks, i.e. one
node's fastest links; then ep, so an expert-parallel group spans neighbouring tp groups):

    rank = ((pp_idx * dp + dp_idx) * ep + ep_idx) * tp + tp_idx

The tp ranks of a group read the same micro-batch and split attention heads and the dense and
shared feed-forward (moe/parallel/tensor.py); everything else is replicated over them. Every
(pp, dp, ep) coordinate reads its own micro-batch: the data-parallel world of the non-expert
parameters is the dp*ep ranks of a pipeline stage with the same tp_idx ("stage group"). Expert
parameters are sharded over the `ep` ranks of a group and replicated over the `dp` ranks that
hold the same experts (same ep_idx and tp_idx).

`build_mesh(dims, device_type)` checks the degrees against the initialized process group and
creates the torch `DeviceMesh` (dims "pp", "dp", "ep", "tp") whose per-dimension groups the
parallelisms use. Backend-neutral: the mesh is built over whatever backend the default process
group uses (gloo on CPU, NCCL on NVIDIA, RCCL through torch's nccl backend on ROCm).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from moe.config import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    dp: int
    ep: int = 1
    pp: int = 1
    tp: int = 1

    @classmethod
    def from_degrees(cls, world_size: int, dp: int = -1, ep: int = 1, pp: int = 1, n_experts: int | None = None,
                     tp: int = 1) -> ParallelDims:
        """dp=-1 takes what is left of the world; raises ConfigError naming the degree and the fix."""
        if world_size < 1:
            raise ConfigError(f"world size {world_size} must be >= 1 (cluster.num_workers).")
        if ep < 1 or pp < 1 or tp < 1:
            raise ConfigError(f"parallel.ep={ep}, parallel.pp={pp} and parallel.tp={tp} must be >= 1.")
        if dp != -1 and dp < 1:
            raise ConfigError(f"parallel.dp={dp} must be >= 1, or -1 for 'the rest of the world'.")
        if world_size % (ep * pp * tp):
            raise ConfigError(
                f"parallel.ep*parallel.pp*parallel.tp={ep * pp * tp} does not divide the world size {world_size}; "
                "choose degrees whose product divides the number of workers (cluster.num_workers)."
            )
        if dp == -1:
            dp = world_size // (ep * pp * tp)
        if dp * ep * pp * tp != world_size:
            raise ConfigError(
                f"parallel.dp*ep*pp*tp={dp}*{ep}*{pp}*{tp}={dp * ep * pp * tp} != world size {world_size}; "
                "set parallel.dp=-1 to take the rest of the world, or change cluster.num_workers."
            )
        if n_experts is not None and n_experts % ep:
            raise ConfigError(
                f"model.moe.n_routed_experts={n_experts} is not divisible by parallel.ep={ep}; "
                "choose an ep that divides the number of experts."
            )
        return cls(world_size=world_size, dp=dp, ep=ep, pp=pp, tp=tp)

    def _rank(self, pp_idx: int, dp_idx: int, ep_idx: int, tp_idx: int) -> int:
        return ((pp_idx * self.dp + dp_idx) * self.ep + ep_idx) * self.tp + tp_idx

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_idx, dp_idx, ep_idx) of a global rank (its tp_idx: `tp_index`)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks.")
        r = rank // self.tp
        return r // (self.dp * self.ep), (r // self.ep) % self.dp, r % self.ep

    def tp_index(self, rank: int) -> int:
        """Position of `rank` in its tensor-parallel group."""
        return rank % self.tp

    def ep_group_ranks(self, rank: int) -> list[int]:
        """Ranks that split the experts among themselves (and exchange tokens) with `rank`."""
        pp_idx, dp_idx, _ = self.coords(rank)
        return [self._rank(pp_idx, dp_idx, e, self.tp_index(rank)) for e in range(self.ep)]

    def expert_dp_group_ranks(self, rank: int) -> list[int]:
        """Ranks that hold the same experts as `rank` (its expert gradients are averaged over these)."""
        pp_idx, _, ep_idx = self.coords(rank)
        return [self._rank(pp_idx, d, ep_idx, self.tp_index(rank)) for d in range(self.dp)]

    def tp_group_ranks(self, rank: int) -> list[int]:
        """Ranks that split attention heads and feed-forward columns with `rank` (same micro-batch)."""
        base = rank - self.tp_index(rank)
        return list(range(base, base + self.tp))

    def pipeline_ranks(self, rank: int) -> list[int]:
        """The pp ranks (one per stage, in stage order) that train the same microbatches as `rank`."""
        _, dp_idx, ep_idx = self.coords(rank)
        return [self._rank(p, dp_idx, ep_idx, self.tp_index(rank)) for p in range(self.pp)]

    def data_rank(self, rank: int) -> int:
        """Which data-parallel replica (dp*ep of them; a pipeline's and a tp group's ranks share one)."""
        _, dp_idx, ep_idx = self.coords(rank)
        return dp_idx * self.ep + ep_idx

    @property
    def data_ranks(self) -> int:
        """Data-parallel replicas: each reads its own micro-batch (ranks of one pipeline share theirs)."""
        return self.dp * self.ep

    def stage_ranks(self, rank: int) -> list[int]:
        """The dp*ep ranks of `rank`'s pipeline stage with its tp_idx: the data-parallel world of its
        non-expert parameters (tensor-parallel shards are averaged with the same shard elsewhere)."""
        pp_idx = self.coords(rank)[0]
        t = self.tp_index(rank)
        return [self._rank(pp_idx, d, e, t) for d in range(self.dp) for e in range(self.ep)]


@dataclass
class Mesh:
    """Process groups of one rank; `None` groups mean 'not distributed' (a world of one)."""

    dims: ParallelDims
    rank: int
    device_mesh: object | None  # torch.distributed.device_mesh.DeviceMesh when distributed
    ep_group: dist.ProcessGroup | None  # this rank's expert-parallel group (token exchange)
    expert_dp_group: dist.ProcessGroup | None  # ranks holding the same experts
    stage_group: dist.ProcessGroup | None  # the dp*ep ranks of this pipeline stage with this tp_idx
    pp_group: dist.ProcessGroup | None = None  # this rank's pipeline (pp ranks), with the pipeline timeout
    tp_group: dist.ProcessGroup | None = None  # this rank's tensor-parallel group (tp > 1)

    @property
    def distributed(self) -> bool:
        return self.stage_group is not None

    @property
    def pp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def ep_rank(self) -> int:
        return self.dims.coords(self.rank)[2]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def tp_mesh(self) -> object:
        """The 1-D DeviceMesh over this rank's tp group (what `parallelize_module` takes)."""
        return self.device_mesh["tp"]


def _pipeline_groups(dims: ParallelDims, rank: int, timeout_s: float | None) -> dist.ProcessGroup | None:
    """Every rank creates every pipeline's group, in the same order; returns `rank`'s (pp > 1)."""
    if dims.pp == 1:
        return None
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    mine = None
    for first in range(dims.dp * dims.ep * dims.tp):  # the stage-0 ranks, one pipeline each
        ranks = dims.pipeline_ranks(first)
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    return mine


def build_mesh(dims: ParallelDims, device_type: str = "cpu", pp_timeout_s: float | None = None) -> Mesh:
    """Create the DeviceMesh and its groups; every rank must call this, in the same order. With pp > 1
    each pipeline also gets its own group for the stages' send/recv, created with `pp_timeout_s`."""
    if not (dist.is_available() and dist.is_initialized()):
        if dims.world_size != 1:
            raise ConfigError(
                f"parallel degrees describe a world of {dims.world_size} ranks but torch.distributed is not "
                "initialized; start workers through Ray Train (or init_process_group) first."
            )
        return Mesh(dims, 0, None, None, None, None, None)
    world = dist.get_world_size()
    if world != dims.world_size:
        raise ConfigError(
            f"parallel degrees describe a world of {dims.world_size} ranks (dp={dims.dp} x ep={dims.ep} x "
            f"pp={dims.pp} x tp={dims.tp}) but the process group has {world}; match cluster.num_workers to the degrees."
        )
    from torch.distributed.device_mesh import init_device_mesh

    device_mesh = init_device_mesh(device_type, (dims.pp, dims.dp, dims.ep, dims.tp),
                                   mesh_dim_names=("pp", "dp", "ep", "tp"))
    rank = dist.get_rank()
    if dims.pp == 1 and dims.tp == 1:
        stage_group = dist.group.WORLD
    else:  # the stage's dp*ep ranks (same tp_idx) as one group
        stage_group = device_mesh["dp", "ep"]._flatten("dp_ep").get_group()
    tp_group = device_mesh.get_group("tp") if dims.tp > 1 else None
    mesh = Mesh(dims, rank, device_mesh, device_mesh.get_group("ep"), device_mesh.get_group("dp"), stage_group,
                _pipeline_groups(dims, rank, pp_timeout_s), tp_group)
    checks = [("ep", mesh.ep_group, dims.ep_group_ranks(rank)), ("dp", mesh.expert_dp_group,
              dims.expert_dp_group_ranks(rank)), ("stage", stage_group, dims.stage_ranks(rank))]
    if tp_group is not None:
        checks.append(("tp", tp_group, dims.tp_group_ranks(rank)))
    for name, group, expected in checks:
        got = dist.get_process_group_ranks(group)
        if got != expected:  # the layout documented above is what gradient sync and tests rely on
            raise RuntimeError(f"DeviceMesh {name} group of rank {rank} is {got}, expected {expected}.")
    return mesh
