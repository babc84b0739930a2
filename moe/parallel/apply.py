"""parallelize(model, dims): apply parallelism to the one-device model in a fixed order.

Today: data parallelism by all-reducing every gradient over the world after backward, and
all-reducing expert loads before the aux-loss-free bias update so every rank holds the same bias.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe.model import MoETransformer
from moe.parallel.mesh import ParallelDims


class ParallelPlan:
    """What parallelize() did to a model, and the collective steps the training loop calls."""

    def __init__(self, model: MoETransformer, dims: ParallelDims) -> None:
        self.model, self.dims = model, dims

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def sync_gradients(self) -> None:
        """Average gradients over the data-parallel world (one flat buffer per dtype)."""
        if not self.distributed:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def reduce_expert_loads(self) -> dict[str, torch.Tensor]:
        """Per MoE layer: routed assignments per expert since the last call, summed over all ranks."""
        loads = {name: moe.take_load() for name, moe in self.model.moe_layers().items()}
        if self.distributed and loads:
            stacked = torch.stack(list(loads.values()))
            dist.all_reduce(stacked)
            loads = dict(zip(loads, stacked, strict=True))
        return loads

    def update_expert_bias(self, loads: dict[str, torch.Tensor]) -> None:
        for name, moe in self.model.moe_layers().items():
            moe.router.update_expert_bias(loads[name])


def parallelize(model: nn.Module, dims: ParallelDims) -> ParallelPlan:
    if dims.ep != 1 or dims.pp != 1:
        raise NotImplementedError("expert and pipeline parallelism are not applied yet; use parallel.ep=1 pp=1.")
    return ParallelPlan(model, dims)
