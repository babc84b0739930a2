"""Expert parallelism: shard each MoE layer's routed experts over an EP group and exchange tokens
with all-to-all, applied to the one-device model from outside (the `dispatch` seam of `GroupedExperts`).

The MoE layer sorts its (token, slot) assignments by global expert id and calls
`experts.gather_combine(x_TD, token_N, counts_E, weight_N)`. Under EP the experts module holds only
experts [ep_rank * E_l, (ep_rank + 1) * E_l) with E_l = E / ep, and `ExpertParallel` is installed
as its `dispatch`: counts are exchanged first (`all_to_all_single`, they size the token exchange),
then each rank sends every destination rank the distinct tokens routed to its experts (once per
rank, not once per expert), with each assignment's token position and combine weight; the
destination runs its local grouped GEMMs over them (`local_gather_combine`, summing a token's
local experts) and sends one row per token back, where it is added into the caller's output.

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

from moe.experts import ExpertShard, GroupedExperts


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
    """Token exchange for one `GroupedExperts` holding E/ep local experts (see module docstring).

    Installed as the module's `dispatch`: `gather_combine(x_TD, token_N, counts_E, weight_N)` with
    rows sorted by global expert becomes
      1. per destination rank, the distinct tokens routed to any of its experts (a token routed to
         k experts of one rank is sent once, not k times), plus per assignment row its token's
         position in that list and its combine weight; counts are exchanged first, they size the rest;
      2. on the expert rank, `local_gather_combine` over the received tokens with the assignment rows
         reordered from (source rank, local expert) to (local expert, source rank): one output row
         per received token, already summed over its local experts;
      3. those rows sent back and added into y_TD at their tokens.
    Every step is differentiable (all-to-all's adjoint is the reverse exchange), so gradients are exact.
    """

    def __init__(self, experts: GroupedExperts, group: dist.ProcessGroup, ep: int) -> None:
        self.experts, self.group, self.ep, self.n_local = experts, group, ep, experts.n_experts
        experts.dispatch = self

    def __call__(self, x_TD: torch.Tensor, token_N: torch.Tensor, counts_E: torch.Tensor,
                 weight_N: torch.Tensor) -> torch.Tensor:
        P, L, T = self.ep, self.n_local, x_TD.shape[0]
        dev = x_TD.device
        counts_PL = counts_E.to(torch.int64).reshape(P, L)
        rows_P = counts_PL.sum(1)  # assignment rows for each destination rank
        rank_N = torch.repeat_interleave(torch.arange(P, device=dev), rows_P, output_size=token_N.numel())
        keys_U, slot_N = torch.unique(rank_N * T + token_N, sorted=True, return_inverse=True)
        tok_U = keys_U % T  # distinct (rank, token) pairs in rank order: the tokens to send
        tok_P = torch.bincount(keys_U // T, minlength=P)
        pos_N = slot_N - (torch.cumsum(tok_P, 0) - tok_P)[rank_N]  # token position within its rank's block

        meta_PM = torch.cat([counts_PL, tok_P.unsqueeze(1)], 1)
        recv_PM = torch.empty_like(meta_PM)
        dist.all_to_all_single(recv_PM, meta_PM, group=self.group)
        recv_PL, recv_tok_P = recv_PM[:, :L], recv_PM[:, L]
        recv_rows_P = recv_PL.sum(1)
        sizes = torch.stack([rows_P, recv_rows_P, tok_P, recv_tok_P]).tolist()  # one host sync
        send_rows, recv_rows, send_tok, recv_tok = sizes

        x_recv = all_to_all(x_TD[tok_U], recv_tok, send_tok, self.group)
        w_recv = all_to_all(weight_N, recv_rows, send_rows, self.group)
        pos_recv = all_to_all(pos_N, recv_rows, send_rows, self.group)
        src_start_P = torch.cumsum(recv_tok_P, 0) - recv_tok_P
        src_R = torch.repeat_interleave(torch.arange(P, device=dev), recv_rows_P, output_size=pos_recv.numel())
        row_tok_R = pos_recv + src_start_P[src_R]  # each received assignment's row in x_recv
        if L > 1:  # assignments arrive (source, local expert); the local experts need (local expert, source)
            order = source_to_expert_order(recv_PL)
            row_tok_R, w_recv = row_tok_R[order], w_recv[order]
        y_recv = self.experts.local_gather_combine(x_recv, row_tok_R, recv_PL.sum(0), w_recv)
        y_U = all_to_all(y_recv, send_tok, recv_tok, self.group)
        return torch.zeros_like(x_TD).index_add(0, tok_U, y_U)

    def remove(self) -> None:
        self.experts.dispatch = None


@torch.no_grad()
def shard_experts(experts: GroupedExperts, ep_rank: int, ep: int) -> None:
    """Keep only experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) in place (new, smaller Parameters) and
    declare the placement on the module (`experts.shard`). Works on the meta device, where it costs nothing."""
    if not experts.shard.is_full:
        raise ValueError(f"these experts are already sharded ({experts.shard}); shard a whole layer once.")
    if experts.n_experts % ep:
        raise ValueError(f"{experts.n_experts} experts cannot be split over ep={ep} ranks.")
    n_local = experts.n_experts // ep
    lo = ep_rank * n_local
    for name in GroupedExperts.PARAM_NAMES:
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(full[lo:lo + n_local].clone(), requires_grad=full.requires_grad))
    experts.shard = ExpertShard(first=lo, count=n_local, total=experts.n_experts)
    experts.n_experts = n_local


def apply_expert_parallel(experts: GroupedExperts, group: dist.ProcessGroup, ep_rank: int, ep: int
                          ) -> ExpertParallel:
    """Shard `experts` to its local slice and install the all-to-all token exchange as its dispatch."""
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
