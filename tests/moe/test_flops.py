"""moe/flops.py's GEMM list against its FLOP formula, tensor parallelism's split of it against the planner's,
and the matrix pass the CPU rate is timed on."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from moe.config import ModelConfig, MoEConfig
from moe.flops import attention_flops, flops_per_token, matmul_pass, training_gemms
from pipelines.train.planner import tp_replicated_flops_per_token

CFG = ModelConfig(name="t", vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, dense_hidden=128,
                  n_dense_layers=1, moe=MoEConfig(n_routed_experts=4, n_shared_experts=3, top_k=2, expert_hidden=48))
NORMS = 6 * (2 * 64 * 3 + 64)  # per token: the norms' weights count as parameters but run no GEMM


@pytest.mark.parametrize(("tp", "ep"), [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_gemm_flops_are_the_flop_formula_split_as_the_planner_splits_it(tp: int, ep: int) -> None:
    batch, seq = 2, 16
    tokens = batch * seq
    gemms = training_gemms(CFG, batch, seq, tp, ep)
    replicated = tp_replicated_flops_per_token(CFG, "none")
    expected = tokens * ((flops_per_token(CFG, seq) - NORMS - replicated) / tp + replicated)
    assert sum(g.training_flops for g in gemms) + attention_flops(CFG, batch, seq, tp) == pytest.approx(expected, rel=1e-12)
    # the routed experts: E/ep local experts, each on ep * T * k / E rows; three products each
    experts = [g for g in gemms if (g.k, g.n) in ((64, 48), (48, 64)) and g.m == ep * tokens * 2 // 4]
    assert sum(g.count for g in experts) == 2 * 3 * (4 // ep)  # 2 MoE layers x (w1, w3, w2) x local experts



class _CountCalls(TorchFunctionMode):
    """Which matrix products and attention kernels Python code calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__matmul__", "matmul"):
            self.calls.append("matmul")
        elif func is F.scaled_dot_product_attention:
            self.calls.append("attention")
        return func(*args, **(kwargs or {}))


def test_matmul_pass_counts_the_listed_products_and_attention_and_runs_them() -> None:
    gemms = training_gemms(CFG, 2, 16, 2, 2)
    flops, one_pass = matmul_pass(CFG, 2, 16, tp=2, ep=2)
    assert flops == sum(g.training_flops for g in gemms) + attention_flops(CFG, 2, 16, 2)
    with _CountCalls() as mode:
        one_pass()
    # each listed GEMM's forward and two backward products, `count` times; one attention per layer
    assert mode.calls.count("matmul") == sum(3 * g.count for g in gemms)
    assert mode.calls.count("attention") == CFG.n_layers
