"""Parameter counts, FLOPs per token and MFU: the one formula every number users see comes from.

Training FLOPs per token = 6 * (active non-embedding parameters + head) + attention, where the
attention term is 12 * n_layers * d_model * seq_len (forward + backward of QK^T and AV; causal
masking is not discounted, matching the common PaLM/Megatron convention).

For the planner's CPU step time: `training_gemms` lists one rank's GEMMs (tp, ep applied) whose FLOPs,
with `attention_flops`, add up to that formula; `matmul_pass` runs them (and attention's fused kernel)
at those shapes, for `pipelines.bench planner` to time in every rank at once between training steps;
`measure_adamw_bandwidth` times an AdamW step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe.config import ModelConfig

ADAMW_TRAFFIC_BYTES = 28  # per fp32 parameter and step: read weight, gradient, two moments; write three


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


@dataclass(frozen=True)
class Gemm:
    """`count` forward products (m x k) @ (k x n) per step; training adds the two backward products of each."""

    m: int
    k: int
    n: int
    count: int = 1

    @property
    def training_flops(self) -> float:
        return 6.0 * self.m * self.k * self.n * self.count


def training_gemms(cfg: ModelConfig, batch: int, seq_len: int, tp: int = 1, ep: int = 1) -> list[Gemm]:
    """The forward GEMMs one rank runs per step on `batch` sequences of `seq_len` tokens (whole model),
    attention's score and value products aside (`attention_flops`: one fused kernel runs them).

    Attention projections, the dense and shared feed-forward have their output (column-wise) or input
    (row-wise) width divided by tp; the router, the routed experts and the head are not split (tp ranks
    compute them in full). The routed experts run per expert (the per-expert kernel) on a balanced
    share: each of this rank's E/ep experts gets ep * T * k / E rows. With tp = ep = 1 their training
    FLOPs plus `attention_flops` are `flops_per_token(cfg, seq_len) * batch * seq_len` less the norms'
    few elementwise FLOPs.
    """
    d, m, T = cfg.d_model, cfg.moe, batch * seq_len
    hq, hkv = cfg.n_heads * cfg.head_dim // tp, cfg.n_kv_heads * cfg.head_dim // tp
    out: list[Gemm] = []
    for layer in range(cfg.n_layers):
        out += [Gemm(T, d, hq), Gemm(T, d, hkv, 2), Gemm(T, hq, d)]
        if not cfg.is_moe_layer(layer):
            out += [Gemm(T, d, cfg.dense_hidden // tp, 2), Gemm(T, cfg.dense_hidden // tp, d)]
            continue
        out.append(Gemm(T, d, m.n_routed_experts))
        if m.n_shared_experts:
            width = m.n_shared_experts * m.expert_hidden // tp
            out += [Gemm(T, d, width, 2), Gemm(T, width, d)]
        rows, local = ep * T * m.top_k // m.n_routed_experts, m.n_routed_experts // ep
        out += [Gemm(rows, d, m.expert_hidden, 2 * local), Gemm(rows, m.expert_hidden, d, local)]
    out.append(Gemm(T, d, cfg.vocab_size))
    return [g for g in out if g.m and g.k and g.n and g.count]


def attention_flops(cfg: ModelConfig, batch: int, seq_len: int, tp: int = 1) -> float:
    """Training FLOPs of attention's score and value products on one rank per step (the formula's
    12 * n_layers * d_model * seq_len per token; tp splits the heads)."""
    return 12.0 * cfg.n_layers * cfg.d_model * seq_len * batch * seq_len / tp


def _best_time(fn, seconds: float, min_calls: int = 3) -> float:
    """Shortest of repeated fn() calls within about `seconds` (at least `min_calls`), after one untimed call."""
    fn()
    best, t_end, n = math.inf, time.perf_counter() + seconds, 0
    while n < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def matmul_pass(cfg: ModelConfig, batch: int, seq_len: int, tp: int = 1, ep: int = 1,
                dtype: torch.dtype = torch.float32) -> tuple[float, Callable[[], None]]:
    """(training FLOPs, a function running them once): one rank's matrix products as a training step runs
    them, at their own shapes, on random operands: every forward GEMM of `training_gemms` with its two
    backward products (dX = dY @ W^T, dW = X^T @ dY), `count` times each, and attention's fused kernel
    (causal scaled_dot_product_attention, forward and backward) once per layer at this rank's heads."""
    operands: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    products: list[tuple[torch.Tensor, torch.Tensor]] = []
    flops = attention_flops(cfg, batch, seq_len, tp)
    for g in training_gemms(cfg, batch, seq_len, tp, ep):
        for m, k, n in ((g.m, g.k, g.n), (g.m, g.n, g.k), (g.k, g.m, g.n)):
            if (m, k, n) not in operands:
                operands[m, k, n] = (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
            products += [operands[m, k, n]] * g.count
        flops += g.training_flops
    h, kv = cfg.n_heads // tp, cfg.n_kv_heads // tp
    q = torch.randn(batch, h, seq_len, cfg.head_dim, dtype=dtype, requires_grad=True)
    k_, v = (torch.randn(batch, kv, seq_len, cfg.head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(batch, h, seq_len, cfg.head_dim, dtype=dtype)

    def one_pass() -> None:
        for a, b in products:
            a @ b
        for _ in range(cfg.n_layers):
            out = torch.nn.functional.scaled_dot_product_attention(q, k_, v, is_causal=True, enable_gqa=h != kv)
            torch.autograd.grad(out, (q, k_, v), grad)

    return flops, one_pass


def measure_adamw_bandwidth(n: int = 1 << 22, steps: int = 5) -> float:
    """Bytes/s an AdamW step (torch's default implementation) reaches on this process's CPU threads, counting
    its minimal traffic of `ADAMW_TRAFFIC_BYTES` per fp32 parameter; the shortest of `steps` steps."""
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = torch.optim.AdamW([p], lr=1e-4)
    return ADAMW_TRAFFIC_BYTES * n / _best_time(opt.step, 0.0, min_calls=steps)
