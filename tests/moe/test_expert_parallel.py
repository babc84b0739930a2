"""Expert parallelism == one process on the global batch: outputs, loss, every gradient, expert
bias, loads and dropped tokens, over two training steps, with real gloo ranks (EP=2, EP=4, DP=2,
DPxEP=2x2), both routers, shared experts, dropless and capacity mode, both expert kernels."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model import build_model
from moe.parallel.apply import parallelize
from moe.parallel.expert import source_to_expert_order
from moe.parallel.mesh import ParallelDims
from tests.moe.distributed import gather_full_state, spawn

TOL = {"atol": 1e-5, "rtol": 1e-5}


def tiny_config(**moe: object) -> ModelConfig:
    base = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32, aux_loss_coef=0.1,
                     z_loss_coef=0.01, bias_update_rate=0.05)
    return ModelConfig(name="ep-test", vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                       max_seq_len=32, dense_hidden=64, n_dense_layers=1, moe=dataclasses.replace(base, **moe))


def _sgd(model: torch.nn.Module, lr: float = 0.5) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def _check_variant(rank: int, world: int, dp: int, ep: int, moe: dict, label: str) -> None:
    cfg = tiny_config(**moe)
    b_local, seq = 2, 12
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg.vocab_size, (world * b_local, seq + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    lo, hi = rank * b_local, (rank + 1) * b_local

    serial = build_model(cfg, seed=0)
    par = build_model(cfg, seed=rank + 7)  # parallelize must broadcast rank 0's weights
    if rank == 0:
        par.load_state_dict(serial.state_dict())
    plan = parallelize(par, ParallelDims.from_degrees(world, dp=dp, ep=ep, n_experts=cfg.moe.n_routed_experts))

    # every trainable parameter is synchronized by exactly one bucket; experts by expert_dp iff ep > 1
    buckets = plan.grad_sync_buckets()
    names = [n for n, p in par.named_parameters() if p.requires_grad]
    flat = buckets["stage"] + buckets["expert_dp"]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat)), label
    expert_names = {n for n in names if ".experts.w" in n}
    assert len(expert_names) == 3 * cfg.n_moe_layers, label
    assert set(buckets["expert_dp"]) == (expert_names if ep > 1 else set()), label

    n_local = cfg.moe.n_routed_experts // ep
    e_lo = (rank % ep) * n_local
    serial_params = dict(serial.named_parameters())
    for step in range(3):
        logits_s = serial(inputs)
        loss_s = F.cross_entropy(logits_s.flatten(0, 1), targets.flatten())
        loss_s.backward()
        logits_p = par(inputs[lo:hi])
        loss_p = F.cross_entropy(logits_p.flatten(0, 1), targets[lo:hi].flatten())
        loss_p.backward()
        plan.sync_gradients()
        where = f"{label} step {step} rank {rank}"
        torch.testing.assert_close(logits_p, logits_s[lo:hi], **TOL, msg=f"logits differ: {where}")
        global_loss = loss_p.detach().clone()
        dist.all_reduce(global_loss)
        torch.testing.assert_close(global_loss / world, loss_s.detach(), **TOL, msg=f"loss differs: {where}")
        for name, p in par.named_parameters():
            ref = serial_params[name].grad
            if name in expert_names:
                assert p.shape[0] == n_local, where
                ref = ref[e_lo:e_lo + n_local]
            assert p.grad is not None, f"{name} has no gradient: {where}"
            torch.testing.assert_close(p.grad, ref, **TOL, msg=lambda m, n=name, w=where: f"grad {n}: {w}\n{m}")
        norm_s = torch.nn.utils.clip_grad_norm_(serial.parameters(), 0.1)
        norm_p = plan.clip_grad_norm_(0.1)
        torch.testing.assert_close(norm_p, norm_s, **TOL, msg=f"grad norm differs: {where}")
        assert norm_s > 0.1, f"clipping was not exercised: {where}"
        _sgd(serial)
        _sgd(par)

        loads_s = {name: m.take_load() for name, m in serial.moe_layers().items()}
        loads_p = plan.reduce_expert_loads()
        for name, m in serial.moe_layers().items():
            torch.testing.assert_close(loads_p[name], loads_s[name], msg=f"load {name}: {where}")
            m.router.update_expert_bias(loads_s[name])
        plan.update_expert_bias(loads_p)
        dropped_p = plan.reduce_dropped_fractions()
        for name, m in serial.moe_layers().items():
            assert dropped_p[name] == pytest.approx(m.take_dropped_fraction(), abs=1e-9), f"dropped {name}: {where}"
            if cfg.moe.capacity_factor > 0 and step == 0:
                assert dropped_p[name] > 0, f"capacity mode dropped nothing, the test is too weak: {where}"
            bias = par.moe_layers()[name].router.expert_bias
            torch.testing.assert_close(bias, m.router.expert_bias, msg=f"bias {name}: {where}")
            everyone = [torch.empty_like(bias) for _ in range(world)]
            dist.all_gather(everyone, bias)
            assert all(torch.equal(b, bias) for b in everyone), f"bias differs across ranks: {where}"
        assert any(m.router.expert_bias.abs().sum() > 0 for m in serial.moe_layers().values())

    # evaluation (no grad): statistics are per rank; with ep=1 a rank can evaluate alone
    if ep > 1 or rank == 0:
        with torch.no_grad():
            torch.testing.assert_close(par(inputs[lo:hi]), serial(inputs[lo:hi]), **TOL, msg=f"eval: {label}")
    dist.barrier()

    full = gather_full_state(par, plan.mesh.ep_group)
    reference = serial.state_dict()
    assert full.keys() == reference.keys(), label
    for key, value in full.items():
        torch.testing.assert_close(value, reference[key], **TOL, msg=f"full state {key}: {label}")


VARIANTS_2 = [
    (1, 2, {"score_func": "softmax", "n_shared_experts": 1}, "ep2 softmax shared dropless grouped_mm"),
    (1, 2, {"score_func": "sigmoid", "n_shared_experts": 0, "capacity_factor": 0.6, "expert_kernel": "loop"},
     "ep2 sigmoid capacity loop"),
    (2, 1, {"score_func": "softmax", "capacity_factor": 0.6}, "dp2 softmax capacity"),
]
VARIANTS_4 = [
    (2, 2, {"score_func": "softmax", "n_shared_experts": 1, "capacity_factor": 0.6}, "dp2xep2 softmax shared capacity"),
    (2, 2, {"score_func": "sigmoid", "n_shared_experts": 2, "expert_kernel": "loop"}, "dp2xep2 sigmoid dropless"),
    (1, 4, {"score_func": "sigmoid", "top_k": 3, "capacity_factor": 0.8}, "ep4 sigmoid top3 capacity"),
]


def _run_variants(rank: int, world: int, variants: list) -> None:
    for dp, ep, moe, label in variants:
        moe = {"expert_kernel": "grouped_mm", **moe}
        _check_variant(rank, world, dp, ep, moe, label)


def test_expert_parallel_two_ranks_equals_one_process() -> None:
    spawn(_run_variants, 2, VARIANTS_2)


def test_dp_x_ep_four_ranks_equals_one_process() -> None:
    spawn(_run_variants, 4, VARIANTS_4)


def test_source_to_expert_order() -> None:
    recv_PL = torch.tensor([[2, 0, 1], [1, 3, 0]])  # rows from rank j for local expert e
    rows = [(j, e) for j in range(2) for e in range(3) for _ in range(int(recv_PL[j, e]))]
    idx = source_to_expert_order(recv_PL)
    reordered = [rows[i] for i in idx.tolist()]
    assert reordered == sorted(rows, key=lambda r: (r[1], r[0]))


def test_parallel_dims_validation_and_layout() -> None:
    d = ParallelDims.from_degrees(8, dp=-1, ep=2, pp=1, n_experts=8)
    assert (d.dp, d.ep) == (4, 2)
    assert d.ep_group_ranks(5) == [4, 5] and d.expert_dp_group_ranks(5) == [1, 3, 5, 7]
    assert d.stage_ranks(5) == list(range(8))
    groups = {tuple(d.ep_group_ranks(r)) for r in range(8)}
    assert sorted(r for g in groups for r in g) == list(range(8))
    with pytest.raises(ConfigError, match="does not divide the world size"):
        ParallelDims.from_degrees(6, ep=4)
    with pytest.raises(ConfigError, match="not divisible by parallel.ep"):
        ParallelDims.from_degrees(4, ep=4, n_experts=6)
    with pytest.raises(ConfigError, match="!= world size"):
        ParallelDims.from_degrees(4, dp=4, ep=2)
    with pytest.raises(ConfigError, match="must be >= 1"):
        ParallelDims.from_degrees(4, ep=0)
