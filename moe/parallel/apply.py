"""parallelize(model, dims): apply parallelism to the one-device model in a fixed order; the plan's steps.

The training worker builds the model on the meta device, parallelizes it there and only then
allocates and initializes its local shards (`moe.model.materialize`), so no rank ever holds the
whole model:
    model = build_meta_model(cfg)                    # structure only, no memory
    plan = parallelize(model, dims, device_type)     # shards on meta, installs the communication
    materialize(model, device, seed)                 # local shards = slices of the one-device init
Order applied by `parallelize` (every rank calls it, after `torch.distributed` is initialized,
before the optimizer is created): meta build -> tp -> ep -> pp -> dp, then materialize.
    1. build the mesh (moe/parallel/mesh.py, dims pp x dp x ep x tp; pp > 1 adds one group per
       pipeline, with the pipeline timeout); a model that is already materialized is broadcast from
       rank 0 first, so every rank starts from identical weights (a meta model gets them from
       `materialize`, which draws the same values on every rank for the same seed);
    2. tensor parallelism (tp > 1, moe/parallel/tensor.py): attention heads and the dense and shared
       feed-forward split column-then-row over the tp group (weights become DTensors);
    3. `shard_model`: expert parallelism (ep > 1) keeps each MoE layer's E/ep local experts and declares
       the placement on the module (`GroupedExperts.shard`); pipeline stages (pp > 1): the layers are
       split into stages of balanced cost and the rank keeps only its stages' layers
       (moe/parallel/pipeline.py). Both are structural and commute (the code prunes stages first so no
       expert of a dropped layer is sliced); no process group needed, so the dry run sizes a rank with it;
    4. activation checkpointing (`activation_checkpointing` none | moe | full, moe/parallel/recompute.py)
       wraps the blocks the rank holds, from outside;
    5. the pipeline (pp > 1): `plan.pipeline` runs the rank's stages under the chosen schedule;
    6. the token exchange (all-to-all, moe/parallel/expert.py) as each expert module's dispatch;
    7. global statistics: the aux loss reduces its statistics over the stage (every dp*ep rank),
       capacity mode drops tokens by the global token order (see moe/moe.py);
    8. data parallelism by gradient all-reduce in `sync_gradients` (below), per stage and tp index.

Training loop, per step (all ranks, same order; ep=1 and ep>1 alike):
    loss = cross_entropy(model(tokens_local), targets_local)   # each rank its own micro-batch
    loss.backward()                                  # pp > 1: plan.pipeline.step(tokens, targets, scale)
    plan.sync_gradients()                            # before grad clipping and optimizer.step()
    plan.clip_grad_norm_(max_norm)                   # not torch's: the norm of the unsharded, all-stage gradient
    optimizer.step(); optimizer.zero_grad()
    loads = plan.reduce_expert_loads()               # {layer: (E,) global assignments per expert}
    plan.update_expert_bias(loads)                   # identical bias on every rank
    dropped = plan.reduce_dropped_fractions()        # {layer: global dropped fraction} (collective)
Under pp the statistics for logging cover the whole model: `gather_over_pipeline`, `aux_losses` and
`reduce_dropped_fractions` add every stage's layers (a stage without MoE layers takes part too).
Saving and export: `moe/checkpoint.py` (sharded checkpoints that reshard, the full model from one).

Gradient sync: every (dp, ep) coordinate reads distinct data (the tp ranks of a group share theirs
and hold identical gradients of every parameter tp does not split), so non-expert gradients, a tp
shard's local slice included, are averaged over the dp*ep ranks of the stage with the same tp index; an expert's gradient already sums the contributions of its EP group
(through the all-to-all's backward), so it is summed over the `dp` ranks holding the same experts
and divided by the same dp*ep. Each parameter belongs to exactly one of the two buckets
(`grad_sync_buckets`); the result equals one process on the global batch. With dp*ep = 1 (tp and/or
pp alone) there is nothing to average; with dp = 1 under ep the expert gradients are only divided
in place (no flat buffer, no copy).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe.experts import GroupedExperts
from moe.model import MoETransformer
from moe.parallel.expert import ExpertParallel, make_counts_gather, make_stats_reducer, shard_experts
from moe.parallel.mesh import Mesh, ParallelDims, build_mesh
from moe.parallel.pipeline import Pipeline, PipelineConfig, prune_to_stages, rank_stages
from moe.parallel.recompute import apply_activation_checkpointing
from moe.parallel.tensor import apply_tensor_parallel, is_tensor_parallel, local


class ParallelPlan:
    """What parallelize() did to a model, and the collective steps the training loop calls."""

    def __init__(self, model: MoETransformer, dims: ParallelDims, mesh: Mesh) -> None:
        self.model, self.dims, self.mesh = model, dims, mesh
        self.expert_parallel: dict[str, ExpertParallel] = {}
        self.pipeline: Pipeline | None = None  # pp > 1: this rank's stages and their schedule
        cfg = model.cfg
        self.moe_layer_names = [str(i) for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]  # whole model
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
        n_ranks = self.dims.dp * self.dims.ep
        if n_ranks == 1:  # tp and/or pp alone: every rank's gradients are already the whole batch's
            return
        params = dict(self.model.named_parameters())
        for bucket, names in self.grad_sync_buckets().items():
            group = self.mesh.stage_group if bucket == "stage" else self.mesh.expert_dp_group
            skip_collective = bucket == "expert_dp" and self.dims.dp == 1
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for name in names:
                p = params[name]
                if p.grad is None:  # every rank must contribute the same buffer layout
                    p.grad = torch.zeros_like(p)
                by_dtype.setdefault(p.grad.dtype, []).append(local(p.grad))  # a tp shard: its local slice
            for grads in by_dtype.values():
                if skip_collective:  # this rank alone holds these experts' gradients: the scale only
                    torch._foreach_div_(grads, n_ranks)
                    continue
                flat = torch.cat([g.reshape(-1) for g in grads])
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
        device = self.model.rope_cos.device

        def squares(names: list[str]) -> torch.Tensor:
            total = torch.zeros((), device=device, dtype=torch.float32)
            for n in names:
                if params[n].grad is not None:
                    total += local(params[n].grad).detach().float().pow(2).sum()
            return total

        expert_sq = squares(buckets["expert_dp"])
        if self.distributed and self.dims.ep > 1:
            dist.all_reduce(expert_sq, group=self.mesh.ep_group)
        split = [n for n in buckets["stage"] if is_tensor_parallel(params[n])]
        split_sq = squares(split)  # tp shards: each rank holds 1/tp of them; the rest is the same on all tp ranks
        if self.mesh.tp_group is not None:
            dist.all_reduce(split_sq, group=self.mesh.tp_group)
        total_sq = squares([n for n in buckets["stage"] if n not in set(split)]) + split_sq + expert_sq
        if self.mesh.pp_group is not None:  # every stage's share: the norm of the whole model
            dist.all_reduce(total_sq, group=self.mesh.pp_group)
        total_norm = total_sq.sqrt()
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
        """Per MoE layer of the whole model: dropped / routed assignments since the last call over the
        whole stage, gathered over the pipeline (collective; a stage without MoE layers takes part)."""
        layers = self.model.moe_layers()
        device = self.model.rope_cos.device
        counts = {n: torch.stack([m.dropped_tokens.float(), m.routed_tokens.float()]) for n, m in layers.items()}
        if self.distributed and counts:
            stacked = torch.stack(list(counts.values()))
            dist.all_reduce(stacked, group=self.mesh.stage_group)
            counts = dict(zip(counts, stacked, strict=True))
        for m in layers.values():
            m.take_dropped_fraction()  # reset the local counters
        full = self.gather_over_pipeline(counts, torch.zeros(2, device=device))
        return {name: float(c[0] / c[1].clamp(min=1)) for name, c in full.items()}

    @torch.no_grad()
    def gather_over_pipeline(self, per_layer: dict[str, torch.Tensor], empty: torch.Tensor
                             ) -> dict[str, torch.Tensor]:
        """Every MoE layer's value (this rank holds only its stages' layers): one all-reduce over the
        pipeline, each stage filling its own rows (`empty` gives a row's shape). Collective under pp."""
        if self.mesh.pp_group is None:
            return per_layer
        rows = torch.stack([per_layer[n].to(empty) if n in per_layer else torch.zeros_like(empty)
                            for n in self.moe_layer_names]) if self.moe_layer_names else empty.new_zeros((0,))
        dist.all_reduce(rows, group=self.mesh.pp_group)
        return dict(zip(self.moe_layer_names, rows, strict=True))

    @torch.no_grad()
    def aux_losses(self) -> dict[str, float]:
        """Last auxiliary and z losses summed over the whole model's MoE layers (for logging; collective
        under pp: each stage adds its layers')."""
        local = self.model.aux_losses()
        if self.mesh.pp_group is None:
            return local
        t = torch.tensor([local["aux_loss"], local["z_loss"]], device=self.model.rope_cos.device)
        dist.all_reduce(t, group=self.mesh.pp_group)
        return {"aux_loss": float(t[0]), "z_loss": float(t[1])}


@torch.no_grad()
def _broadcast_from_rank0(model: nn.Module, group: dist.ProcessGroup) -> None:
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.numel()]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    src = dist.get_global_rank(group, 0)
    for group_tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group_tensors])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for t in group_tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def shard_model(model: MoETransformer, dims: ParallelDims, rank: int,
                pipeline: PipelineConfig | None = None) -> None:
    """Keep `rank`'s share of the model, in place, in the fixed order: pipeline stages first (pp > 1:
    only the layers, embedding and head of this rank's stages), then expert parallelism inside them
    (ep > 1: each MoE layer keeps the experts of its EP coordinate). Structural only (no process
    group), so it runs on a meta model to size a layout before any memory is spent, and on the real
    one inside `parallelize`."""
    if dims.pp > 1:
        pipeline = (pipeline or PipelineConfig()).validate(dims.pp, model.cfg.n_layers)
        pp_rank = dims.coords(rank)[0]
        prune_to_stages(model, rank_stages(model.cfg, dims.pp, pp_rank, pipeline.virtual_stages))
    if dims.ep == 1:
        return
    ep_rank = dims.coords(rank)[2]
    for name, moe in model.moe_layers().items():
        if moe.experts.n_experts % dims.ep:
            raise ValueError(f"layer {name}: {moe.experts.n_experts} experts not divisible by ep={dims.ep}.")
        shard_experts(moe.experts, ep_rank, dims.ep)


def parallelize(model: MoETransformer, dims: ParallelDims, device_type: str | None = None,
                pipeline: PipelineConfig | None = None, activation_checkpointing: str = "none") -> ParallelPlan:
    """Apply the parallelisms `dims` asks for to `model` in place; returns the plan the loop steps with.

    `model` is either on the meta device (then `materialize` it afterwards; `device_type` is required)
    or materialized (then rank 0's weights are broadcast first). device_type ("cpu" or "cuda", ROCm
    included) defaults to the device of a materialized model's parameters. `pipeline` says how
    stages are scheduled when dims.pp > 1 (defaults: `PipelineConfig()`). `activation_checkpointing`
    (none | moe | full) says which parts recompute their activations in the backward (moe/parallel/recompute.py).
    """
    on_meta = any(p.is_meta for p in model.parameters())
    if device_type is None:
        if on_meta:
            raise ValueError("parallelize() of a meta-device model needs device_type ('cpu' or 'cuda').")
        device_type = next(model.parameters()).device.type
    pipeline = (pipeline or PipelineConfig()).validate(dims.pp, model.cfg.n_layers)
    mesh = build_mesh(dims, device_type, pipeline.timeout_s)
    plan = ParallelPlan(model, dims, mesh)
    if not mesh.distributed:
        apply_activation_checkpointing(model, activation_checkpointing)
        return plan
    if not on_meta:  # the whole model is still here: every rank takes global rank 0's weights
        _broadcast_from_rank0(model, dist.group.WORLD)
    if dims.tp > 1:  # 1. tensor parallelism: heads and feed-forward columns split over the tp group
        apply_tensor_parallel(model, mesh.tp_mesh)
    shard_model(model, dims, mesh.rank, pipeline)  # 2. experts (ep), 3. stages (pp): structural, they commute
    apply_activation_checkpointing(model, activation_checkpointing)
    if dims.pp > 1:
        specs = rank_stages(model.cfg, dims.pp, mesh.pp_rank, pipeline.virtual_stages)
        device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else device_type
        plan.pipeline = Pipeline(model, specs, pipeline, mesh.pp_group, device)
    for name, moe in model.moe_layers().items():
        if dims.ep > 1:
            plan.expert_parallel[name] = ExpertParallel(moe.experts, mesh.ep_group, dims.ep)
        moe.reduce_stats = make_stats_reducer(mesh.stage_group)
        if moe.cfg.capacity_factor > 0:
            moe.gather_counts = make_counts_gather(mesh.stage_group)
    return plan  # 3. data-parallel gradient sync: plan.sync_gradients() over each stage's dp*ep ranks
