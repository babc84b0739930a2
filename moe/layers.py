"""One-device building blocks: RMSNorm, rotary embeddings, grouped-query causal attention, SwiGLU.

Written for one device; tensor parallelism (moe/parallel/tensor.py) splits the attention heads and
the feed-forward columns from outside, so `Attention` reads its local head counts off the
projections' outputs, and `init_full_` draws a sharded weight's whole one-device value and keeps
the local slice (every layout starts from the same weights for the same seed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moe.config import ModelConfig

if TYPE_CHECKING:
    from moe.kv_cache import LayerKVCache


def init_full_(weight: torch.Tensor, init_fn: Callable[[torch.Tensor], object]) -> None:
    """`init_fn` applied to the whole weight as on one device; a tensor-parallel shard (a DTensor) draws the
    full global-shape value from the same random stream and keeps its own slice (no communication)."""
    if not isinstance(weight, DTensor):
        init_fn(weight)
        return
    full = torch.empty(weight.shape, dtype=weight.dtype, device=weight.to_local().device)
    init_fn(full)
    weight.copy_(distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        normed = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, each (max_seq_len, head_dim // 2), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs_TF = torch.outer(t, inv_freq)
    return freqs_TF.cos(), freqs_TF.sin()


def apply_rotary(x_BHTd: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]); cos/sin are (T, d/2) or (B, 1, T, d/2) for per-row positions."""
    x_f = x_BHTd.float()
    x1, x2 = x_f[..., 0::2], x_f[..., 1::2]
    out = torch.stack((x1 * cos_TF - x2 * sin_TF, x1 * sin_TF + x2 * cos_TF), dim=-1)
    return out.flatten(-2).type_as(x_BHTd)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads and rotary position embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        """Without `kv_cache`: causal attention over x. With it (decoding): cos/sin hold each row's
        positions, the new keys/values are written into the cache and the queries attend to every
        cached position up to their own (`kv_cache.update` returns keys, values and that mask)."""
        B, T, _ = x_BTD.shape  # heads: -1, as tensor parallelism leaves each rank n_heads / tp of them
        q = self.wq(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = q.shape[1] != k.shape[1]
        if kv_cache is None:
            out_BHTd = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k_BHSd, v_BHSd, mask_B1TS = kv_cache.update(k, v)
            out_BHTd = F.scaled_dot_product_attention(q, k_BHSd, v_BHSd, attn_mask=mask_B1TS, enable_gqa=gqa)
        return self.wo(out_BHTd.transpose(1, 2).reshape(B, T, -1))

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            init_full_(lin.weight, lambda w: nn.init.trunc_normal_(w, std=std))
        init_full_(self.wo.weight, lambda w: nn.init.trunc_normal_(w, std=out_std))


class SwiGLU(nn.Module):
    """Dense gated feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float) -> None:
        init_full_(self.w1.weight, lambda w: nn.init.trunc_normal_(w, std=std))
        init_full_(self.w3.weight, lambda w: nn.init.trunc_normal_(w, std=std))
        init_full_(self.w2.weight, lambda w: nn.init.trunc_normal_(w, std=out_std))
