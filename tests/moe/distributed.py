"""Helpers for multi-process tests: spawn N real gloo ranks on CPU and run a function on each."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: object) -> None:
    """Run fn(rank, world_size, *args) in `world_size` spawned processes joined by a gloo group.

    An exception in any rank fails the caller with that rank's traceback (torch.multiprocessing).
    """
    fd, init_file = tempfile.mkstemp(prefix="gloo-init-")
    os.close(fd)
    os.unlink(init_file)  # FileStore creates it; a stale file would hang the rendezvous
    try:
        mp.spawn(_entry, args=(world_size, init_file, fn, args), nprocs=world_size, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


@torch.no_grad()
def gather_full_state(model: torch.nn.Module, ep_group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an expert-parallel model (collective over `ep_group`): expert
    weights, sharded by the placement on their `GroupedExperts.shard`, are all-gathered in EP order."""
    from moe.experts import GroupedExperts

    sharded = {f"{prefix}.{name}" for prefix, m in model.named_modules()
               if isinstance(m, GroupedExperts) and not m.shard.is_full for name in GroupedExperts.PARAM_NAMES}
    full = {}
    for key, value in model.state_dict().items():
        if key in sharded:
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(parts, value.contiguous(), group=ep_group)
            value = torch.cat(parts, dim=0)
        full[key] = value.detach()
    return full
