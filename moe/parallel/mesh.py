"""The world arranged as (pp x dp x ep): degrees, their validation, and rank coordinates."""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    dp: int
    ep: int = 1
    pp: int = 1

    @classmethod
    def from_degrees(cls, world_size: int, dp: int = -1, ep: int = 1, pp: int = 1, n_experts: int | None = None
                     ) -> ParallelDims:
        """dp=-1 takes what is left of the world; raises ConfigError naming the degree and the fix."""
        if ep < 1 or pp < 1:
            raise ConfigError(f"parallel.ep={ep} and parallel.pp={pp} must be >= 1.")
        if world_size % (ep * pp):
            raise ConfigError(
                f"parallel.ep*parallel.pp={ep * pp} does not divide the world size {world_size}; "
                "choose degrees whose product divides the number of workers (cluster.num_workers)."
            )
        if dp == -1:
            dp = world_size // (ep * pp)
        if dp * ep * pp != world_size:
            raise ConfigError(
                f"parallel.dp*ep*pp={dp}*{ep}*{pp}={dp * ep * pp} != world size {world_size}; "
                "set parallel.dp=-1 to take the rest of the world, or change cluster.num_workers."
            )
        if n_experts is not None and n_experts % ep:
            raise ConfigError(
                f"model.moe.n_routed_experts={n_experts} is not divisible by parallel.ep={ep}; "
                "choose an ep that divides the number of experts."
            )
        return cls(world_size=world_size, dp=dp, ep=ep, pp=pp)
