"""parallelize(model, dims): apply parallelism to the one-device model in a fixed order; the plan's steps.

The training worker builds the model on the meta device, parallelizes it there and only then
allocates and initializes its local shards (`moe.model.materialize`), so no rank ever holds the
whole model:
    model = build_meta_model(cfg)                    # structure only, no memory
    plan = parallelize(model, dims, device_type)     # shards on meta, installs the communication
    materialize(model, device, seed)                 # local shards = slices of the one-device init
Order applied by `parallelize` (every rank calls it, after `torch.distributed` is initialized,
before the optimizer is created):
    1. build the mesh (moe/parallel/mesh.py); a model that is already materialized is broadcast from
       rank 0 of the stage, so every rank starts from identical weights (a meta model gets them from
       `materialize`, which draws the same values on every rank for the same seed);
    2. `shard_model`: expert parallelism (ep > 1) keeps each MoE layer's E/ep local experts and
       declares the placement on the module (`GroupedExperts.shard`); structural only, no process
       group needed, so the dry-run plan uses it to size every rank's share;
    3. the token exchange (all-to-all, moe/parallel/expert.py) as each expert module's dispatch;
    4. global statistics: the aux loss reduces its statistics over the stage (every dp*ep rank),
       capacity mode drops tokens by the global token order (see moe/moe.py);
    5. data parallelism by gradient all-reduce in `sync_gradients` (below).

Training loop, per step (all ranks, same order; ep=1 and ep>1 alike):
    loss = cross_entropy(model(tokens_local), targets_local)   # each rank its own micro-batch
    loss.backward()
    plan.sync_gradients()                            # before grad clipping and optimizer.step()
    plan.clip_grad_norm_(max_norm)                   # not torch's: the norm of the unsharded gradient
    optimizer.step(); optimizer.zero_grad()
    loads = plan.reduce_expert_loads()               # {layer: (E,) global assignments per expert}
    plan.update_expert_bias(loads)                   # identical bias on every rank
    dropped = plan.reduce_dropped_fractions()        # {layer: global dropped fraction} (collective)
Saving and export: `moe/checkpoint.py` (sharded checkpoints that reshard, the full model from one).

Gradient sync: every rank reads distinct data, so non-expert gradients are averaged over all
dp*ep ranks of the stage; an expert's gradient already sums the contributions of its EP group
(through the all-to-all's backward), so it is summed over the `dp` ranks holding the same experts
and divided by the same dp*ep. Each parameter belongs to exactly one of the two buckets
(`grad_sync_buckets`); the result equals one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe.experts import GroupedExperts
from moe.model import MoETransformer
from moe.parallel.expert import ExpertParallel, make_counts_gather, make_stats_reducer, shard_experts
from moe.parallel.mesh import Mesh, ParallelDims, build_mesh


class ParallelPlan:
    """What parallelize() did to a model, and the collective steps the training loop calls."""

    def __init__(self, model: MoETransformer, dims: ParallelDims, mesh: Mesh) -> None:
        self.model, self.dims, self.mesh = model, dims, mesh
        self.expert_parallel: dict[str, ExpertParallel] = {}
        self.expert_param_names = {f"{prefix}.{name}" for prefix, mod in model.named_modules()
                                   if isinstance(mod, GroupedExperts) for name in GroupedExperts.PARAM_NAMES}

    @property
    def distributed(self) -> bool:
        return self.mesh.distributed

    def grad_sync_buckets(self) -> dict[str, list[str]]:
        """Parameter names per gradient all-reduce: "stage" (all dp*ep ranks) or "expert_dp" (same experts)."""
        buckets: dict[str, list[str]] = {"stage": [], "expert_dp": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            sharded_expert = name in self.expert_param_names and self.dims.ep > 1
            buckets["expert_dp" if sharded_expert else "stage"].append(name)
        return buckets

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average gradients as one process on the global batch would compute them (see module docstring)."""
        if not self.distributed:
            return
        params = dict(self.model.named_parameters())
        n_ranks = self.dims.dp * self.dims.ep
        for bucket, names in self.grad_sync_buckets().items():
            group = self.mesh.stage_group if bucket == "stage" else self.mesh.expert_dp_group
            skip_collective = bucket == "expert_dp" and self.dims.dp == 1
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for name in names:
                p = params[name]
                if p.grad is None:  # every rank must contribute the same buffer layout
                    p.grad = torch.zeros_like(p)
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
            for grads in by_dtype.values():
                flat = torch.cat([g.reshape(-1) for g in grads])
                if not skip_collective:
                    dist.all_reduce(flat, group=group)
                flat /= n_ranks
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the full, unsharded model (call after `sync_gradients`).

        The local norm would differ between EP ranks (each holds other experts' gradients) and so
        would the clip factor, letting replicated parameters drift apart; here expert squares are
        summed over the EP group, so the norm and the factor are the same on every rank.
        Returns the total norm.
        """
        params = dict(self.model.named_parameters())
        buckets = self.grad_sync_buckets()
        device = next(iter(params.values())).device

        def squares(names: list[str]) -> torch.Tensor:
            total = torch.zeros((), device=device, dtype=torch.float32)
            for n in names:
                if params[n].grad is not None:
                    total += params[n].grad.detach().float().pow(2).sum()
            return total

        expert_sq = squares(buckets["expert_dp"])
        if self.distributed and self.dims.ep > 1:
            dist.all_reduce(expert_sq, group=self.mesh.ep_group)
        total_norm = (squares(buckets["stage"]) + expert_sq).sqrt()
        coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
        for p in params.values():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total_norm

    @torch.no_grad()
    def reduce_expert_loads(self) -> dict[str, torch.Tensor]:
        """Per MoE layer: routed assignments per (global) expert since the last call, summed over the stage."""
        loads = {name: moe.take_load() for name, moe in self.model.moe_layers().items()}
        if self.distributed and loads:
            stacked = torch.stack(list(loads.values()))
            dist.all_reduce(stacked, group=self.mesh.stage_group)
            loads = dict(zip(loads, stacked, strict=True))
        return loads

    def update_expert_bias(self, loads: dict[str, torch.Tensor]) -> None:
        """Aux-loss-free bias step from global loads; identical inputs keep the bias identical on every rank."""
        for name, moe in self.model.moe_layers().items():
            moe.router.update_expert_bias(loads[name])

    @torch.no_grad()
    def reduce_dropped_fractions(self) -> dict[str, float]:
        """Per MoE layer: dropped / routed assignments since the last call over the whole stage (collective)."""
        layers = self.model.moe_layers()
        if not layers:
            return {}
        counts = torch.stack([torch.stack([m.dropped_tokens.float(), m.routed_tokens.float()])
                              for m in layers.values()])
        if self.distributed:
            dist.all_reduce(counts, group=self.mesh.stage_group)
        for m in layers.values():
            m.take_dropped_fraction()  # reset the local counters
        return {name: float(c[0] / c[1].clamp(min=1)) for name, c in zip(layers, counts)}


@torch.no_grad()
def _broadcast_from_stage_rank0(model: nn.Module, mesh: Mesh) -> None:
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.numel()]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    src = dist.get_global_rank(mesh.stage_group, 0)
    for group_tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group_tensors])
        dist.broadcast(flat, src=src, group=mesh.stage_group)
        offset = 0
        for t in group_tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def shard_model(model: MoETransformer, dims: ParallelDims, rank: int) -> None:
    """Keep `rank`'s share of every sharded parameter, in place: with ep > 1 each MoE layer keeps the
    experts of its EP coordinate. Structural only (no process group), so it runs on a meta model to
    size a layout before any memory is spent, and on the real one inside `parallelize`."""
    if dims.pp != 1:
        raise NotImplementedError("pipeline parallelism is not applied yet; use parallel.pp=1.")
    if dims.ep == 1:
        return
    ep_rank = dims.coords(rank)[2]
    for name, moe in model.moe_layers().items():
        if moe.experts.n_experts % dims.ep:
            raise ValueError(f"layer {name}: {moe.experts.n_experts} experts not divisible by ep={dims.ep}.")
        shard_experts(moe.experts, ep_rank, dims.ep)


def parallelize(model: MoETransformer, dims: ParallelDims, device_type: str | None = None) -> ParallelPlan:
    """Apply the parallelisms `dims` asks for to `model` in place; returns the plan the loop steps with.

    `model` is either on the meta device (then `materialize` it afterwards; `device_type` is required)
    or materialized (then rank 0's weights are broadcast first). device_type ("cpu" or "cuda", ROCm
    included) defaults to the device of a materialized model's parameters.
    """
    if dims.pp != 1:
        raise NotImplementedError("pipeline parallelism is not applied yet; use parallel.pp=1.")
    on_meta = any(p.is_meta for p in model.parameters())
    if device_type is None:
        if on_meta:
            raise ValueError("parallelize() of a meta-device model needs device_type ('cpu' or 'cuda').")
        device_type = next(model.parameters()).device.type
    mesh = build_mesh(dims, device_type)
    plan = ParallelPlan(model, dims, mesh)
    if not mesh.distributed:
        return plan
    if not on_meta:
        _broadcast_from_stage_rank0(model, mesh)
    shard_model(model, dims, mesh.rank)
    for name, moe in model.moe_layers().items():
        if dims.ep > 1:
            plan.expert_parallel[name] = ExpertParallel(moe.experts, mesh.ep_group, dims.ep)
        moe.reduce_stats = make_stats_reducer(mesh.stage_group)
        if moe.cfg.capacity_factor > 0:
            moe.gather_counts = make_counts_gather(mesh.stage_group)
    return plan
