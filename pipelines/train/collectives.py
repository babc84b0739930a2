"""The few collectives the training worker itself calls (the model's own live in moe/parallel);
each is a no-op in a world of one, so the worker runs unchanged without torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over every rank; returns `t`."""
    if distributed():
        dist.all_reduce(t, op=op)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on all), concatenated in rank order."""
    if not distributed():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s (picklable) `obj` on every rank."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
