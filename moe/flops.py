"""Parameter counts, FLOPs per token and MFU: the one formula every number users see comes from.

Training FLOPs per token = 6 * (active non-embedding parameters + head) + attention, where the
attention term is 12 * n_layers * d_model * seq_len (forward + backward of QK^T and AV; causal
masking is not discounted, matching the common PaLM/Megatron convention).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moe.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # parameters touched by one token (shared + top_k routed experts)
    embedding: int


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, m = cfg.d_model, cfg.moe
    attn = d * cfg.n_heads * cfg.head_dim * 2 + d * cfg.n_kv_heads * cfg.head_dim * 2
    norms = 2 * d
    dense_ffn = 3 * d * cfg.dense_hidden
    expert = 3 * d * m.expert_hidden
    router = d * m.n_routed_experts
    shared = m.n_shared_experts * expert
    moe_total = router + shared + m.n_routed_experts * expert
    moe_active = router + shared + m.top_k * expert
    n_dense, n_moe = cfg.n_dense_layers, cfg.n_moe_layers
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    body_total = cfg.n_layers * (attn + norms) + n_dense * dense_ffn + n_moe * moe_total + d
    body_active = cfg.n_layers * (attn + norms) + n_dense * dense_ffn + n_moe * moe_active + d
    return ParamCounts(total=embedding + head + body_total, active=embedding + head + body_active,
                       embedding=embedding)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs for one token at context length `seq_len`."""
    counts = param_counts(cfg)
    matmul_params = counts.active - counts.embedding
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilization against `peak_flops` (the sum over all devices used)."""
    return tokens_per_s * flops_per_token(cfg, seq_len) / peak_flops if peak_flops > 0 else 0.0


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, trials: int = 5,
                        seconds: float = 0.15) -> float:
    """FLOP/s of a square matmul on this process's CPU threads: the CPU 'peak' MFU is measured against.

    Best of several short trials, so a moment of contention from other processes does not lower
    the peak (which would inflate MFU).
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            iters += 1
        best = max(best, 2.0 * n**3 * iters / (time.perf_counter() - t0))
    return best
