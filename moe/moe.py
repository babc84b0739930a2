"""The MoE feed-forward layer: router -> sort tokens by expert -> routed experts -> weighted combine,
plus always-on shared experts.

Load-balancing state lives in buffers here: `tokens_per_expert` accumulates routed assignments
since the last balance step (`update_expert_bias` consumes it). The auxiliary and z losses are
added to the backward pass by `attach_aux_loss` (their gradient flows without changing the
layer's output), so any wrapper (DDP, pipeline stages) sees a plain tensor-in, tensor-out module.
Their detached values are kept on the module for logging.

Seams for parallelism (moe/parallel sets them; the layer itself never communicates):
- `reduce_stats`: all-reduces (counts, probability sums, token count) so the aux loss uses the
  statistics of the global batch.
- `gather_counts`: capacity mode only. Capacity semantics: each expert keeps at most
  ceil(capacity_factor * T_global * top_k / E) assignments per forward, where T_global is the
  token count of the whole global batch (all ranks), kept first-come in global token order
  (rank order, then token order, then slot). With no seam set the local batch is the global
  batch, so one process on the global batch and any parallel layout drop exactly the same tokens.
- `experts.dispatch`, called by `experts.gather_combine(x_TD, token_N, counts_E, weight_N)`:
  expert parallelism installs its token exchange there.

Routing inspection (opt-in, for serving): while `routing_record` is a list, every forward appends
the (T, K) expert ids and combine weights it used, detached, in token order (`record_routing`
turns it on for every MoE layer of a model for the length of a `with` block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moe.config import ModelConfig, expert_capacity
from moe.experts import GroupedExperts
from moe.layers import SwiGLU
from moe.router import TopKRouter, load_balance_loss, router_z_loss

StatsReducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# (this rank's [counts_E..., n_tokens] int64 (E+1,)) -> (every rank's rows in global batch order (R, E+1), own row)
CountsGather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


class AuxLossBackprop(torch.autograd.Function):
    """Returns `x` unchanged; in backward also sends gradient 1 into `aux_loss`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(aux_loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)

def attach_aux_loss(x: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    if not aux_loss.requires_grad:
        return x
    return AuxLossBackprop.apply(x, aux_loss)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.moe
        self.cfg = m
        self.router = TopKRouter(cfg.d_model, m)
        self.experts = GroupedExperts(m.n_routed_experts, cfg.d_model, m.expert_hidden, m.expert_kernel)
        self.shared = SwiGLU(cfg.d_model, m.n_shared_experts * m.expert_hidden) if m.n_shared_experts else None
        self.register_buffer("tokens_per_expert", torch.zeros(m.n_routed_experts), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)
        self.register_buffer("routed_tokens", torch.zeros(()), persistent=False)
        self.reduce_stats: StatsReducer | None = None
        self.gather_counts: CountsGather | None = None
        self.last_aux_loss = torch.zeros(())
        self.last_z_loss = torch.zeros(())
        self.routing_record: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see the module docstring

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        route = self.router(x_TD)
        if self.routing_record is not None:
            self.routing_record.append((route.topk_idx_TK.detach(), route.topk_weight_TK.detach()))
        y_TD, counts_E = self.dispatch_combine(x_TD, route.topk_idx_TK, route.topk_weight_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if self.training or torch.is_grad_enabled():  # inference (eval, no gradient) reads no loss
            y_TD = attach_aux_loss(y_TD, self._balance_losses(route.topk_idx_TK, route.probs_TE, route.logits_TE))
        return y_TD.view(shape)

    def dispatch_combine(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort (token, slot) assignments by expert, run the experts, scatter-add the weighted outputs."""
        n_tokens, top_k = topk_idx_TK.shape
        n_experts = self.cfg.n_routed_experts
        flat_expert_N = topk_idx_TK.reshape(-1)
        order_N = torch.argsort(flat_expert_N, stable=True)
        counts_E = torch.bincount(flat_expert_N, minlength=n_experts)
        kept_counts_E = self._kept_counts(counts_E, n_tokens)
        if kept_counts_E is None:
            kept_counts_E = counts_E
        else:
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            sorted_expert_N = flat_expert_N[order_N]
            pos_in_expert_N = torch.arange(order_N.numel(), device=x_TD.device) - starts_E[sorted_expert_N]
            order_N = order_N[pos_in_expert_N < kept_counts_E[sorted_expert_N]]
        token_N = order_N // top_k
        weight_N = topk_weight_TK.reshape(-1)[order_N]
        y_TD = self.experts.gather_combine(x_TD, token_N, kept_counts_E, weight_N)
        with torch.no_grad():
            self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
            self.routed_tokens += counts_E.sum()
            self.dropped_tokens += counts_E.sum() - kept_counts_E.sum()
        return y_TD, counts_E

    def _kept_counts(self, counts_E: torch.Tensor, n_tokens: int) -> torch.Tensor | None:
        """Capacity mode: assignments each expert keeps from this batch (see the module docstring)."""
        if self.cfg.capacity_factor <= 0:
            return None
        if self.gather_counts is None:
            return counts_E.clamp(max=expert_capacity(n_tokens, self.cfg))
        rows_RE, me = self.gather_counts(torch.cat([counts_E, counts_E.new_tensor([n_tokens])]))
        capacity = expert_capacity(int(rows_RE[:, -1].sum()), self.cfg)
        before_E = rows_RE[:me, :-1].sum(0)  # assignments of earlier ranks that the expert kept first
        return (capacity - before_E).clamp(min=0).minimum(counts_E)

    def _balance_losses(self, topk_idx_TK: torch.Tensor, probs_TE: torch.Tensor, logits_TE: torch.Tensor
                        ) -> torch.Tensor:
        m = self.cfg
        total = logits_TE.new_zeros(())
        if m.aux_loss_coef > 0:
            counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=m.n_routed_experts).float()
            probs_sum_E = probs_TE.sum(0)
            n_tokens = torch.tensor(float(probs_TE.shape[0]), device=probs_TE.device)
            if self.reduce_stats is not None:
                counts_E, probs_sum_E, n_tokens = self.reduce_stats(counts_E, probs_sum_E, n_tokens)
            aux = load_balance_loss(counts_E, probs_sum_E, n_tokens)
            self.last_aux_loss = aux.detach()
            total = total + m.aux_loss_coef * aux
        if m.z_loss_coef > 0:
            z = router_z_loss(logits_TE)
            self.last_z_loss = z.detach()
            total = total + m.z_loss_coef * z
        return total

    @torch.no_grad()
    def take_load(self) -> torch.Tensor:
        """Routed assignments per expert since the last call, then reset the counter."""
        load_E = self.tokens_per_expert.clone()
        self.tokens_per_expert.zero_()
        return load_E

    @torch.no_grad()
    def take_dropped_fraction(self) -> float:
        frac = float(self.dropped_tokens / self.routed_tokens.clamp(min=1))
        self.dropped_tokens.zero_()
        self.routed_tokens.zero_()
        return frac

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)
        self.tokens_per_expert.zero_()
        self.dropped_tokens.zero_()
        self.routed_tokens.zero_()


@contextmanager
def record_routing(layers: dict[str, MoE]) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Within the block, each layer's forwards append their (expert ids (T, K), combine weights (T, K))
    to the list under its layer id; recording stops when the block ends."""
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    for name, layer in layers.items():
        layer.routing_record = records[name]
    try:
        yield records
    finally:
        for layer in layers.values():
            layer.routing_record = None
