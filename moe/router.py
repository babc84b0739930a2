"""Top-k token-choice router: softmax or sigmoid scores, aux-loss-free expert bias, aux loss, z-loss.

The expert bias (DeepSeek-V3) only changes which experts are *selected*; the combine weights come
from the unbiased scores. It lives in a buffer here and is moved by `update_expert_bias`, called
explicitly after the optimizer step with loads that the caller may have all-reduced across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import MoEConfig


@dataclass
class RouterOutput:
    topk_idx_TK: torch.Tensor  # (T, K) int64 expert ids
    topk_weight_TK: torch.Tensor  # (T, K) combine weights
    probs_TE: torch.Tensor  # (T, E) normalized scores (rows sum to 1), used by the aux loss
    logits_TE: torch.Tensor  # (T, E) raw gate logits, used by the z-loss


class TopKRouter(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(d_model, cfg.n_routed_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.cfg
        # the gate in fp32 whatever the model's dtype (as the stock transformers routers compute it), so
        # a bf16 model selects the same experts as its fp32 export
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        selection_TE = scores_TE + self.expert_bias if cfg.bias_update_rate > 0 else scores_TE
        topk_idx_TK = selection_TE.topk(cfg.top_k, dim=-1, sorted=False).indices
        topk_weight_TK = scores_TE.gather(-1, topk_idx_TK)
        if cfg.norm_topk_prob and cfg.top_k > 1:
            topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
        topk_weight_TK = (topk_weight_TK * cfg.route_scale).type_as(x_TD)
        return RouterOutput(topk_idx_TK, topk_weight_TK, probs_TE, logits_TE)

    def init_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=std)
        self.expert_bias.zero_()

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded ones."""
        if self.cfg.bias_update_rate <= 0 or load_E.sum() == 0:
            return
        load_E = load_E.to(self.expert_bias)
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)


def load_balance_loss(counts_E: torch.Tensor, probs_sum_E: torch.Tensor, n_tokens: torch.Tensor | int
                      ) -> torch.Tensor:
    """Switch/DeepSeek auxiliary loss E * sum_e f_e * P_e.

    f_e is the share of routed assignments that went to expert e (no gradient), P_e the mean
    normalized score of expert e over the tokens. Callers pass sums so they can be all-reduced
    over ranks first, which makes the loss a function of the global batch.
    """
    n_experts = counts_E.numel()
    f_E = counts_E.float() / counts_E.sum().clamp(min=1)
    p_E = probs_sum_E / n_tokens
    return n_experts * (f_E.detach() * p_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of the gate logits (ST-MoE); keeps logits small and routing stable."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()

