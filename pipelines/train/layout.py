"""The parallel layout of every world size an elastic run may have, and the startup check of the range.

An elastic run (`cluster.min_workers` < `cluster.num_workers`) restarts with whatever number of
workers the cluster can host. `layout_for` picks the layout of a world size deterministically from
the configured degrees: the largest tp dividing both `parallel.tp` and the world size, then the
largest ep not above `parallel.ep` that divides what is left and the expert count, then the largest pp not above `parallel.pp` that divides what is left and that the
pipeline schedule can run on the layer count; dp takes the rest. At `cluster.num_workers` an
explicit `parallel.dp` must fit exactly (the configured layout is used as is).

The global batch (`train.global_batch_size`, default: `train.micro_batch_size` x the data-parallel
ranks at full size) is the same at every size: each data-parallel rank (dp x ep ranks; the pp ranks
of a pipeline share one) runs `accumulation` micro-batches of `train.micro_batch_size` per step.
`check_elastic_range` lays out every size in [min, max] at startup, so a size that cannot be laid
out, or a global batch that does not divide at some size, is a config error before Ray starts
instead of a crash loop after a node is lost. The ranks of a tp group read the same micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe.config import ConfigError
from moe.parallel.mesh import ParallelDims
from moe.parallel.pipeline import PipelineConfig


@dataclass(frozen=True)
class Degrees:
    """The configured degrees (`parallel.dp|ep|pp|tp`); dp=-1 takes the rest of the world."""

    dp: int = -1
    ep: int = 1
    pp: int = 1
    tp: int = 1


@dataclass(frozen=True)
class WorldLayout:
    """One world size's mesh and how its data-parallel ranks make up the global batch."""

    dims: ParallelDims
    micro_batch_size: int  # sequences per data-parallel rank (a whole pipeline under pp) per micro-step
    accumulation: int  # micro-steps per optimizer step

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.dims.data_ranks * self.accumulation

    def describe(self) -> str:
        d = self.dims
        return (f"world {d.world_size}: dp={d.dp} ep={d.ep} pp={d.pp} tp={d.tp}, {d.data_ranks} data-parallel ranks x "
                f"{self.micro_batch_size} seq x {self.accumulation} accumulation = {self.global_batch}")


def _largest_divisor(limit: int, *numbers: int) -> int:
    return max(d for d in range(1, limit + 1) if all(n % d == 0 for n in numbers))


def _pipeline_ok(pipeline: PipelineConfig, pp: int, n_layers: int, micro_batch_size: int) -> bool:
    try:
        pipeline.validate(pp, n_layers)
    except ConfigError:
        return False
    return pp == 1 or (micro_batch_size % pipeline.microbatches == 0 and micro_batch_size % pp == 0)


def mesh_for(world: int, degrees: Degrees, n_experts: int, n_layers: int, pipeline: PipelineConfig,
             micro_batch_size: int, full_world: int) -> ParallelDims:
    """The mesh of `world` workers (module docstring); at `full_world` the configured degrees as is."""
    if world == full_world:
        return ParallelDims.from_degrees(world, degrees.dp, degrees.ep, degrees.pp, n_experts, tp=degrees.tp)
    tp = _largest_divisor(min(degrees.tp, world), world, degrees.tp)  # a divisor of tp splits the heads too
    rest = world // tp
    ep = _largest_divisor(min(degrees.ep, rest), rest, n_experts)
    pp = max(p for p in range(1, min(degrees.pp, rest // ep) + 1)
             if (rest // ep) % p == 0 and _pipeline_ok(pipeline, p, n_layers, micro_batch_size))
    return ParallelDims.from_degrees(world, -1, ep, pp, n_experts, tp=tp)


def default_global_batch(degrees: Degrees, n_experts: int, n_layers: int, pipeline: PipelineConfig,
                         micro_batch_size: int, full_world: int) -> int:
    """`train.global_batch_size` when unset: one micro-batch per data-parallel rank at full size."""
    dims = mesh_for(full_world, degrees, n_experts, n_layers, pipeline, micro_batch_size, full_world)
    return micro_batch_size * dims.data_ranks


def layout_for(world: int, degrees: Degrees, n_experts: int, n_layers: int, pipeline: PipelineConfig,
               micro_batch_size: int, global_batch: int, full_world: int) -> WorldLayout:
    """The layout of `world` workers; ConfigError when the global batch does not divide there."""
    dims = mesh_for(world, degrees, n_experts, n_layers, pipeline, micro_batch_size, full_world)
    per_step = dims.data_ranks * micro_batch_size
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not a multiple of {per_step} at world size {world} "
            f"(dp={dims.dp} ep={dims.ep} pp={dims.pp}: {dims.data_ranks} data-parallel ranks x "
            f"train.micro_batch_size={micro_batch_size}); gradient accumulation needs whole micro-batches.")
    return WorldLayout(dims, micro_batch_size, global_batch // per_step)


def check_elastic_range(min_world: int, max_world: int, degrees: Degrees, n_experts: int, n_layers: int,
                        pipeline: PipelineConfig, micro_batch_size: int, global_batch: int) -> list[WorldLayout]:
    """The layout of every size in [min_world, max_world]; one ConfigError naming every bad size and the fix."""
    meshes = {w: mesh_for(w, degrees, n_experts, n_layers, pipeline, micro_batch_size, max_world)
              for w in range(min_world, max_world + 1)}  # a bad configured layout raises here, naming its key
    bad = [w for w, dims in meshes.items() if global_batch % (dims.data_ranks * micro_batch_size)]
    if bad:
        multiple = math.lcm(*(dims.data_ranks * micro_batch_size for dims in meshes.values()))
        detail = "; ".join(f"world {w}: dp={meshes[w].dp} ep={meshes[w].ep} pp={meshes[w].pp} has "
                           f"{meshes[w].data_ranks} data-parallel ranks x {micro_batch_size}" for w in bad)
        raise ConfigError(
            f"train.global_batch_size={global_batch} cannot be made up at world sizes {bad} of the elastic range "
            f"[cluster.min_workers={min_world}, cluster.num_workers={max_world}] ({detail} sequences per "
            f"micro-step do not divide it). Fix: set train.global_batch_size to a multiple of {multiple}, or "
            f"narrow the range (cluster.min_workers), or lower train.micro_batch_size.")
    return [layout_for(w, degrees, n_experts, n_layers, pipeline, micro_batch_size, global_batch, max_world)
            for w in meshes]
