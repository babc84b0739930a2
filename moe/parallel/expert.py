"""Expert parallelism: shard each MoE layer's routed experts over an EP group and exchange tokens
with all-to-all, applied to the one-device model from outside (forward hooks on `GroupedExperts`).

The MoE layer sorts its (token, slot) assignments by global expert id and calls
`experts(x_sorted_ND, counts_E, weight_N)`. Under EP the experts module holds only experts
[ep_rank * E_l, (ep_rank + 1) * E_l) with E_l = E / ep, and its call is wrapped:

    pre-hook   counts_E (E,) viewed as (ep, E_l) -> all_to_all_single: recv_PL[j, e] = tokens rank j
               sends to local expert e (counts are exchanged first, they size the token exchange)
               x_sorted (and weight_N) -> all_to_all_single with uneven splits -> rows ordered
               (source rank, expert)
               + a row order (expert, source rank) for the local experts (`rows_N`)
    experts    the local grouped GEMMs on (x_recv_ND, recv_PL.sum(0), w_N, rows_N): each expert reads
               its rows through rows_N and writes its outputs back in arrival order
    post-hook  all_to_all_single back with the splits swapped
               -> rows in the caller's original sorted order; the layer combines as on one device

`_AllToAll` and `_AllReduceSum` are autograd functions whose backward is the adjoint collective
(all-to-all with swapped splits; all-reduce of the gradients), so gradients are exact in both
directions. Only torch.distributed collectives that gloo, NCCL and RCCL all implement are used.

Also here: the distributed statistics the MoE layer's seams take (`make_stats_reducer` for the
aux loss over the global batch, `make_counts_gather` for capacity mode in global token order).
Both communicate only while autograd is recording (training); under `torch.no_grad()`
(evaluation, generation) they use the rank's own batch, so with ep=1 a rank may evaluate alone.
With ep>1 every forward exchanges tokens: all ranks of an EP group must run it together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe.experts import GroupedExperts

EXPERT_PARAM_NAMES = ("w1", "w2", "w3")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits along dim 0; backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],  # noqa: D102
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: D102
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the adjoint sums the gradients of every rank's copy of the result."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: D102
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
               ) -> torch.Tensor:
    """Differentiable `all_to_all_single`: send in_splits[j] rows of x to rank j, receive out_splits[j]."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-reduce (sum)."""
    return _AllReduceSum.apply(x, group)


def source_to_expert_order(recv_PL: torch.Tensor) -> torch.Tensor:
    """Row index that reorders a buffer laid out (source rank, local expert) into (local expert, source rank).

    recv_PL[j, e] rows came from rank j for local expert e; blocks are contiguous in row-major (j, e) order.
    """
    sizes_PL = recv_PL.reshape(-1)
    starts_PL = (torch.cumsum(sizes_PL, 0) - sizes_PL).view_as(recv_PL)
    sizes_LP, starts_LP = recv_PL.t().reshape(-1), starts_PL.t().reshape(-1)
    total = int(sizes_PL.sum())
    dst_starts_LP = torch.cumsum(sizes_LP, 0) - sizes_LP
    shift_LP = starts_LP - dst_starts_LP  # source row = destination row + shift of its block
    return torch.arange(total, device=recv_PL.device) + torch.repeat_interleave(shift_LP, sizes_LP, output_size=total)


class ExpertParallel:
    """Token exchange around one `GroupedExperts` that holds E/ep local experts (see module docstring)."""

    def __init__(self, experts: GroupedExperts, group: dist.ProcessGroup, ep: int) -> None:
        self.group, self.ep, self.n_local = group, ep, experts.n_experts
        self._state: list[tuple[torch.Tensor, list[int], list[int]]] = []
        self.handles = [experts.register_forward_pre_hook(self._dispatch),
                        experts.register_forward_hook(self._combine)]

    def _dispatch(self, module: nn.Module, args: tuple) -> tuple[torch.Tensor, ...]:
        x_ND, counts_E, *rest = args
        weight_N = rest[0] if rest else None
        counts_PL = counts_E.to(torch.int64).reshape(self.ep, self.n_local)
        recv_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_PL, counts_PL, group=self.group)
        send_recv = torch.stack([counts_PL.sum(1), recv_PL.sum(1)]).tolist()  # one host sync
        send_splits, recv_splits = send_recv
        x_recv_ND = all_to_all(x_ND, recv_splits, send_splits, self.group)
        w_recv_N = None if weight_N is None else all_to_all(weight_N, recv_splits, send_splits, self.group)
        # Rows arrive as (source rank, local expert); the experts read them in (local expert, source
        # rank) order through `rows_N` and write their outputs back in arrival order (no copies).
        rows_N = None if self.n_local == 1 else source_to_expert_order(recv_PL)  # n_local=1: already in order
        if rows_N is not None and w_recv_N is not None:
            w_recv_N = w_recv_N[rows_N]
        self._state.append((send_splits, recv_splits))
        return x_recv_ND, recv_PL.sum(0), w_recv_N, rows_N

    def _combine(self, module: nn.Module, args: tuple, out_recv_ND: torch.Tensor) -> torch.Tensor:
        send_splits, recv_splits = self._state.pop()
        return all_to_all(out_recv_ND, send_splits, recv_splits, self.group)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def shard_experts(experts: GroupedExperts, ep_rank: int, ep: int) -> None:
    """Keep only experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) in place (new, smaller Parameters)."""
    if experts.n_experts % ep:
        raise ValueError(f"{experts.n_experts} experts cannot be split over ep={ep} ranks.")
    n_local = experts.n_experts // ep
    lo = ep_rank * n_local
    for name in EXPERT_PARAM_NAMES:
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(full[lo:lo + n_local].clone(), requires_grad=full.requires_grad))
    experts.n_experts = n_local
    experts.expert_offset = lo


def apply_expert_parallel(experts: GroupedExperts, group: dist.ProcessGroup, ep_rank: int, ep: int
                          ) -> ExpertParallel:
    """Shard `experts` to its local slice and wrap its forward with the all-to-all token exchange."""
    shard_experts(experts, ep_rank, ep)
    return ExpertParallel(experts, group, ep)


def make_stats_reducer(group: dist.ProcessGroup):
    """MoE.reduce_stats: sum (counts_E, probs_sum_E, n_tokens) over `group` in one differentiable all-reduce."""

    def reduce(counts_E: torch.Tensor, probs_sum_E: torch.Tensor, n_tokens: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not torch.is_grad_enabled():  # evaluation: the loss is not trained, keep forward communication-free
            return counts_E, probs_sum_E, n_tokens
        n = counts_E.numel()
        packed = torch.cat([counts_E.to(probs_sum_E.dtype), probs_sum_E, n_tokens.to(probs_sum_E).reshape(1)])
        total = all_reduce_sum(packed, group)
        return total[:n].detach(), total[n:2 * n], total[2 * n].detach()

    return reduce


def make_counts_gather(group: dist.ProcessGroup):
    """MoE.gather_counts: every rank's [counts_E..., n_tokens] in group rank order (= global batch order)."""

    def gather(local: torch.Tensor) -> tuple[torch.Tensor, int]:
        if not torch.is_grad_enabled():  # evaluation: this rank's batch is the batch
            return local.unsqueeze(0), 0
        rows = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, local.contiguous(), group=group)
        return torch.stack(rows), dist.get_rank(group)

    return gather
