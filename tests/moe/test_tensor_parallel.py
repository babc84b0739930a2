"""Tensor parallelism == one process on the global batch (real gloo ranks): tp=2 built on the meta
device and materialized, tp=2 x ep=2 and tp=2 x dp=2 from a broadcast model, over two SGD steps:
logits, loss, every gradient, the clipped norm, expert loads and bias. Checkpoints written under
tp=2 load under tp=1 (and the whole model in one process) and back. Activation checkpointing
(moe, full) leaves loss, gradients and the MoE counters of one process unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe.checkpoint import load_checkpoint, load_full_model, save_checkpoint
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model import build_meta_model, build_model, materialize
from moe.parallel.apply import parallelize
from moe.parallel.mesh import ParallelDims
from moe.parallel.recompute import apply_activation_checkpointing
from moe.parallel.tensor import check_tensor_parallel, is_tensor_parallel
from tests.moe.distributed import gather_full_state, spawn

TOL = {"atol": 1e-5, "rtol": 1e-5}


def tiny_config(**moe: object) -> ModelConfig:
    base = MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden=16, aux_loss_coef=0.1,
                     z_loss_coef=0.01, bias_update_rate=0.05)
    return ModelConfig(name="tp-test", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_seq_len=16, dense_hidden=48, n_dense_layers=1, moe=dataclasses.replace(base, **moe))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_tensor_parallel(t) else t


def _sgd(model: torch.nn.Module, lr: float = 0.5) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def _batch(cfg: ModelConfig, n_data: int, b_local: int = 2, seq: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, cfg.vocab_size, (n_data * b_local, seq + 1), generator=torch.Generator().manual_seed(7))
    return tokens[:, :-1], tokens[:, 1:]


def _check(rank: int, world: int, dims: ParallelDims, cfg: ModelConfig, meta: bool, label: str) -> None:
    serial = build_model(cfg, seed=0)
    if meta:
        par = build_meta_model(cfg)
        plan = parallelize(par, dims, device_type="cpu")
        materialize(par, "cpu", seed=0)
    else:
        par = build_model(cfg, seed=rank + 3)  # parallelize broadcasts rank 0's weights
        if rank == 0:
            par.load_state_dict(serial.state_dict())
        plan = parallelize(par, dims)
    assert any(is_tensor_parallel(p) for p in par.parameters()), label
    assert not is_tensor_parallel(par.layers["1"].ffn.router.gate.weight), label  # the router sees the full hidden state
    inputs, targets = _batch(cfg, dims.data_ranks)
    b = inputs.shape[0] // dims.data_ranks
    lo = dims.data_rank(rank) * b
    n_local, e_lo = cfg.moe.n_routed_experts // dims.ep, dims.coords(rank)[2] * cfg.moe.n_routed_experts // dims.ep
    ref = dict(serial.named_parameters())
    for step in range(2):
        where = f"{label} step {step} rank {rank}"
        logits_s = serial(inputs)
        loss_s = F.cross_entropy(logits_s.flatten(0, 1), targets.flatten())
        loss_s.backward()
        logits_p = par(inputs[lo:lo + b])
        loss_p = F.cross_entropy(logits_p.flatten(0, 1), targets[lo:lo + b].flatten())
        loss_p.backward()
        plan.sync_gradients()
        torch.testing.assert_close(logits_p, logits_s[lo:lo + b].detach(), **TOL, msg=f"logits: {where}")
        total = loss_p.detach().clone()
        dist.all_reduce(total)  # the tp ranks of a group hold the same loss: the world mean is the data mean
        torch.testing.assert_close(total / world, loss_s.detach(), **TOL, msg=f"loss: {where}")
        for name, p in par.named_parameters():
            want = ref[name].grad[e_lo:e_lo + n_local] if ".experts.w" in name else ref[name].grad
            torch.testing.assert_close(_full(p.grad), want, **TOL, msg=lambda m, n=name, w=where: f"grad {n}: {w}\n{m}")
        norm_s = torch.nn.utils.clip_grad_norm_(serial.parameters(), 0.1)
        torch.testing.assert_close(plan.clip_grad_norm_(0.1), norm_s, **TOL, msg=f"norm: {where}")
        _sgd(serial)
        _sgd(par)
        loads_s = {n: m.take_load() for n, m in serial.moe_layers().items()}
        loads_p = plan.reduce_expert_loads()
        for n, m in serial.moe_layers().items():
            torch.testing.assert_close(loads_p[n], loads_s[n], msg=f"load {n}: {where}")
            m.router.update_expert_bias(loads_s[n])
        plan.update_expert_bias(loads_p)
    for n, m in serial.moe_layers().items():
        torch.testing.assert_close(par.moe_layers()[n].router.expert_bias, m.router.expert_bias, msg=label)
    with torch.no_grad():
        full = {k: _full(v) for k, v in gather_full_state(par, plan.mesh.ep_group).items()}
    for key, value in serial.state_dict().items():
        torch.testing.assert_close(full[key], value, **TOL, msg=f"state {key}: {label}")


def _opt(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)


def _train_step(model: torch.nn.Module, plan: object, opt: torch.optim.Optimizer, inputs: torch.Tensor,
                targets: torch.Tensor) -> None:
    F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
    plan.sync_gradients()
    opt.step()
    opt.zero_grad()


def _reshard(rank: int, world: int, directory: str) -> None:
    """Save under tp=2 (one data rank), load under dp=2 (tp=1) and in one process, and back under tp=2."""
    cfg = tiny_config()
    inputs, targets = _batch(cfg, 1)
    tp2 = build_meta_model(cfg)
    plan = parallelize(tp2, ParallelDims.from_degrees(world, tp=2), device_type="cpu")
    materialize(tp2, "cpu", seed=0)
    opt = _opt(tp2)
    _train_step(tp2, plan, opt, inputs, targets)  # AdamW moments exist and differ from zero
    save_checkpoint(tp2, opt, Path(directory), {"step": 1}, rank)
    want = {k: _full(v).detach().clone() for k, v in tp2.state_dict().items()}
    moments = {n: _full(opt.state[p]["exp_avg"]).clone() for n, p in tp2.named_parameters()}

    dp2 = build_meta_model(cfg)
    plan_dp = parallelize(dp2, ParallelDims.from_degrees(world, dp=2), device_type="cpu")
    materialize(dp2, "cpu", seed=5)
    opt_dp = _opt(dp2)
    assert load_checkpoint(dp2, opt_dp, Path(directory))["step"] == 1
    for k, v in dp2.state_dict().items():
        torch.testing.assert_close(v, want[k], msg=f"tp2 -> tp1: {k}")
    for n, p in dp2.named_parameters():
        torch.testing.assert_close(opt_dp.state[p]["exp_avg"], moments[n], msg=f"tp2 -> tp1 moment: {n}")
    whole = load_full_model(cfg, Path(directory))  # the whole model (collective here, as DCP is under a group)
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(v, want[k], msg=f"tp2 -> whole model: {k}")
    _train_step(dp2, plan_dp, opt_dp, inputs[:1], targets[:1])  # both dp ranks read the same row: one batch
    save_checkpoint(dp2, opt_dp, Path(directory) / "again", {"step": 2}, rank)
    back = build_meta_model(cfg)
    parallelize(back, ParallelDims.from_degrees(world, tp=2), device_type="cpu")
    materialize(back, "cpu", seed=9)
    assert load_checkpoint(back, _opt(back), Path(directory) / "again")["step"] == 2
    for k, v in back.state_dict().items():
        torch.testing.assert_close(_full(v), dp2.state_dict()[k], msg=f"tp1 -> tp2: {k}")


def _tp2(rank: int, world: int, directory: str) -> None:
    cfg = tiny_config(score_func="sigmoid")
    _check(rank, world, ParallelDims.from_degrees(world, tp=2), cfg, meta=True, label="tp2 meta")
    _reshard(rank, world, directory)


def _tp2_ep2(rank: int, world: int) -> None:
    cfg = tiny_config(score_func="softmax", capacity_factor=0.8)
    _check(rank, world, ParallelDims.from_degrees(world, ep=2, tp=2, n_experts=4), cfg, meta=False, label="tp2xep2")
    cfg = tiny_config(score_func="sigmoid", n_shared_experts=2)
    _check(rank, world, ParallelDims.from_degrees(world, dp=2, tp=2), cfg, meta=True, label="tp2xdp2")


def test_tensor_parallel_two_ranks_equals_one_process_and_reshards(tmp_path: Path) -> None:
    spawn(_tp2, 2, str(tmp_path))


def test_tensor_x_expert_parallel_four_ranks_equals_one_process() -> None:
    spawn(_tp2_ep2, 4)


def test_tensor_parallel_layout_and_config_errors() -> None:
    d = ParallelDims.from_degrees(8, ep=2, tp=2)
    assert (d.dp, d.ep, d.tp) == (2, 2, 2)
    assert d.tp_group_ranks(5) == [4, 5] and d.ep_group_ranks(5) == [5, 7]
    assert d.stage_ranks(5) == [1, 3, 5, 7] and d.data_rank(4) == d.data_rank(5) == 2
    with pytest.raises(ConfigError, match=r"parallel.tp=4 does not divide model.n_kv_heads=2"):
        check_tensor_parallel(tiny_config(), 4)
    with pytest.raises(ConfigError, match="does not divide the world size"):
        ParallelDims.from_degrees(6, tp=4)


@pytest.mark.parametrize("mode", ["moe", "full"])
def test_activation_checkpointing_keeps_loss_gradients_and_counters(mode: str) -> None:
    cfg = tiny_config(capacity_factor=0.8)
    inputs, targets = _batch(cfg, 2)
    plain, wrapped = build_model(cfg, seed=0), build_model(cfg, seed=0)
    names = apply_activation_checkpointing(wrapped, mode)
    assert names == (["layers.1.ffn"] if mode == "moe" else ["layers.0", "layers.1"])
    losses = [F.cross_entropy(m(inputs).flatten(0, 1), targets.flatten()) for m in (plain, wrapped)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], **TOL)
    ref = dict(plain.named_parameters())
    for name, p in wrapped.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, **TOL, msg=name)
    a, b = plain.moe_layers()["1"], wrapped.moe_layers()["1"]
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert) and a.tokens_per_expert.sum() > 0
    assert torch.equal(a.dropped_tokens, b.dropped_tokens) and float(a.last_aux_loss) == float(b.last_aux_loss)
    with pytest.raises(ConfigError, match="train.activation_checkpointing='some'"):
        apply_activation_checkpointing(wrapped, "some")


def _tp2_pp2(rank: int, world: int) -> None:
    """tp=2 x pp=2 (1F1B, 2 microbatches) equals one process accumulating the same microbatches."""
    from moe.experts import accumulate_expert_grads_in_place
    from moe.parallel.pipeline import PipelineConfig
    from tests.moe.test_pipeline_parallel import _batch as pp_batch
    from tests.moe.test_pipeline_parallel import _expert_slice, _reference_step, pp_config

    cfg, pc = pp_config(), PipelineConfig("1f1b", 2)
    dims = ParallelDims.from_degrees(world, pp=2, tp=2, n_experts=cfg.moe.n_routed_experts)
    tokens, targets = pp_batch(1)
    serial, par = build_model(cfg, seed=0), build_meta_model(cfg)
    plan = parallelize(par, dims, device_type="cpu", pipeline=pc)
    materialize(par, "cpu", seed=0)
    for model in (serial, par):
        accumulate_expert_grads_in_place(model)
    count = int((targets != -100).sum())
    ref = dict(serial.named_parameters())
    for step in range(2):
        loss_s = _reference_step(serial, tokens, targets, 1, pc.microbatches, False)
        loss_p = plan.pipeline.step(tokens[:, :-1], targets, loss_scale=1 / count)
        if plan.pipeline.is_last:
            torch.testing.assert_close(loss_p, loss_s, **TOL, msg=f"tp2xpp2 loss step {step}")
        plan.sync_gradients()
        for name, p in par.named_parameters():
            want = _expert_slice(par, name, ref[name].grad)
            torch.testing.assert_close(_full(p.grad), want, **TOL, msg=lambda m, n=name: f"tp2xpp2 grad {n}\n{m}")
        norm_s = torch.nn.utils.clip_grad_norm_(serial.parameters(), 0.1)
        torch.testing.assert_close(plan.clip_grad_norm_(0.1), norm_s, **TOL, msg=f"tp2xpp2 norm step {step}")
        for model in (serial, par):
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
                    p.grad.zero_()
        for m in serial.moe_layers().values():
            m.take_load()
        plan.reduce_expert_loads()


def test_tensor_x_pipeline_parallel_four_ranks_equals_one_process() -> None:
    spawn(_tp2_pp2, 4)
