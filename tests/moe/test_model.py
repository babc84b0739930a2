"""One-device model checks: grouped experts == plain per-expert loop, one expert == dense SwiGLU,
capacity mode drops exactly the late assignments, and a tiny model overfits one batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe.config import ModelConfig, MoEConfig, expert_capacity
from moe.experts import GroupedExperts
from moe.layers import SwiGLU
from moe.model import build_model
from moe.moe import MoE

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _cfg(**moe: object) -> ModelConfig:
    base = MoEConfig(n_routed_experts=8, n_shared_experts=0, top_k=2, expert_hidden=32)
    return ModelConfig(name="t", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                       dense_hidden=64, n_dense_layers=1, moe=dataclasses.replace(base, **moe))


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_grouped_experts_equal_reference_loop(kernel: str, score_func: str) -> None:
    torch.manual_seed(0)
    moe = MoE(_cfg(expert_kernel=kernel, score_func=score_func, top_k=3))
    moe.init_weights(0.1, 0.1)
    x_TD = torch.randn(40, 32)
    route = moe.router(x_TD)
    idx, w = route.topk_idx_TK, route.topk_weight_TK.detach().requires_grad_(True)
    x1 = x_TD.clone().requires_grad_(True)
    y, counts_E = moe.dispatch_combine(x1, idx, w)
    assert int(counts_E.sum()) == 40 * 3
    params = [x1, w, moe.experts.w1, moe.experts.w2, moe.experts.w3]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, g)
    x2 = x_TD.clone().requires_grad_(True)
    y_ref = moe.experts.reference_forward(x2, idx, w)
    grads_ref = torch.autograd.grad(y_ref, [x2, *params[1:]], g)
    torch.testing.assert_close(y, y_ref, **TOL)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("path", ["gather_combine", "sorted_rows"])
def test_in_place_grad_accumulation_equals_autograd(path: str) -> None:
    """Two backward passes with `accumulate_grad_in_place` leave the same .grad as autograd's own
    accumulation; experts that get no rows keep their earlier gradient; other gradients are unchanged."""
    torch.manual_seed(0)
    models = [MoE(_cfg(expert_kernel="loop", top_k=2)) for _ in range(2)]
    models[0].init_weights(0.1, 0.1)
    models[1].load_state_dict(models[0].state_dict())
    models[1].experts.accumulate_grad_in_place = True
    for step in range(2):
        x_TD = torch.randn(24, 32)
        g = torch.randn(24, 32)
        idx = torch.randint(0, 6, (24, 2))  # experts 6 and 7 get no rows
        w = torch.rand(24, 2)
        for m in models:
            xi = x_TD.clone().requires_grad_(True)
            if path == "gather_combine":
                y, _ = m.dispatch_combine(xi, idx, w)
            else:
                order = torch.argsort(idx.reshape(-1), stable=True)
                counts = torch.bincount(idx.reshape(-1), minlength=8)
                y = m.experts(xi[order // 2], counts, w.reshape(-1)[order])
                g_step = g[order // 2]
            y.backward(g if path == "gather_combine" else g_step)
        if step == 0:  # the first pass allocates (.grad was None); the second adds in place
            for m in models:
                assert m.experts.w1.grad is not None
    for name in ("w1", "w2", "w3"):
        a, b = getattr(models[0].experts, name).grad, getattr(models[1].experts, name).grad
        torch.testing.assert_close(b, a, **TOL)
        assert torch.count_nonzero(b[6:]) == 0


def test_experts_with_no_tokens_stay_in_the_graph() -> None:
    experts = GroupedExperts(4, 16, 8, kernel="loop")
    experts.init_weights(0.1, 0.1)
    x = torch.zeros(0, 16, requires_grad=True)
    out = experts(x, torch.zeros(4, dtype=torch.int64))
    assert out.shape == (0, 16)
    gx, gw = torch.autograd.grad(out.sum(), [x, experts.w2])
    assert gx.shape == (0, 16) and torch.count_nonzero(gw) == 0


def test_one_expert_top1_equals_dense_swiglu() -> None:
    torch.manual_seed(0)
    cfg = _cfg(n_routed_experts=1, top_k=1, aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=0.0)
    moe = MoE(cfg)
    moe.init_weights(0.1, 0.1)
    dense = SwiGLU(cfg.d_model, cfg.moe.expert_hidden)
    with torch.no_grad():  # nn.Linear stores (out, in); expert weights are (in, out)
        dense.w1.weight.copy_(moe.experts.w1[0].t())
        dense.w3.weight.copy_(moe.experts.w3[0].t())
        dense.w2.weight.copy_(moe.experts.w2[0].t())
    x = torch.randn(2, 10, cfg.d_model)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_moe, y_dense = moe(x1), dense(x2)
    torch.testing.assert_close(y_moe, y_dense, **TOL)
    g = torch.randn_like(y_moe)
    (gx_moe, gw1_moe) = torch.autograd.grad(y_moe, [x1, moe.experts.w1], g)
    (gx_dense, gw1_dense) = torch.autograd.grad(y_dense, [x2, dense.w1.weight], g)
    torch.testing.assert_close(gx_moe, gx_dense, **TOL)
    torch.testing.assert_close(gw1_moe[0], gw1_dense.t(), **TOL)


def test_capacity_keeps_the_first_assignments_per_expert() -> None:
    torch.manual_seed(0)
    cfg = _cfg(capacity_factor=0.5, top_k=2)
    moe = MoE(cfg)
    moe.init_weights(0.1, 0.1)
    T = 32
    capacity = expert_capacity(T, cfg.moe)
    assert capacity == 4
    x_TD = torch.randn(T, cfg.d_model)
    idx = torch.zeros(T, 2, dtype=torch.int64)
    idx[:, 1] = torch.arange(T) % 8  # slot 1 spreads evenly (4 per expert, all kept but expert 0's)
    idx[:, 0] = torch.where(torch.arange(T) % 8 == 0, 1, 0)  # slot 0: expert 0 overloaded
    w = torch.full((T, 2), 0.5)
    y, counts_E = moe.dispatch_combine(x_TD, idx, w)
    # expected: per expert, keep the first `capacity` (token, slot) assignments in flat order
    seen = torch.zeros(8, dtype=torch.int64)
    y_ref = torch.zeros_like(x_TD)
    for t in range(T):
        for k in range(2):
            e = int(idx[t, k])
            if seen[e] < capacity:
                one_idx = torch.tensor([[e]])
                y_ref[t] += moe.experts.reference_forward(x_TD[t:t + 1], one_idx, w[t:t + 1, k:k + 1])[0]
            seen[e] += 1
    torch.testing.assert_close(y, y_ref, **TOL)
    dropped = int((seen - capacity).clamp(min=0).sum())
    assert dropped > 0
    assert moe.take_dropped_fraction() == pytest.approx(dropped / (2 * T))
    torch.testing.assert_close(moe.take_load(), counts_E.float())


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    cfg = _cfg(n_shared_experts=1, expert_kernel="loop")
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        for m in model.moe_layers().values():
            m.router.update_expert_bias(m.take_load())
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_sorted_rows_forward_equals_reference_loop(kernel: str) -> None:
    """The sorted-rows entry point (what expert parallelism calls) against the masked loop."""
    torch.manual_seed(1)
    experts = GroupedExperts(6, 16, 8, kernel=kernel)
    experts.init_weights(0.2, 0.2)
    T, K = 30, 2
    x = torch.randn(T, 16, requires_grad=True)
    idx_TK = torch.stack([torch.randperm(5)[:K] for _ in range(T)])  # expert 5 gets no rows
    w_TK = torch.rand(T, K, requires_grad=True)
    order = torch.argsort(idx_TK.reshape(-1), stable=True)
    token = order // K
    counts = torch.bincount(idx_TK.reshape(-1), minlength=6)
    out = experts(x[token], counts, w_TK.reshape(-1)[order])
    y = torch.zeros(T, 16).index_add(0, token, out)
    y_ref = experts.reference_forward(x, idx_TK, w_TK)
    torch.testing.assert_close(y, y_ref, **TOL)
    g = torch.randn_like(y)
    params = [x, w_TK, experts.w1, experts.w2, experts.w3]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g)):
        torch.testing.assert_close(a, b, **TOL)
