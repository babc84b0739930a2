"""Pipeline parallelism == one process, with real gloo ranks: for gpipe, 1f1b and interleaved_1f1b,
pp=2, pp=2 x ep=2 and pp=2 x dp=2 equal one process doing gradient accumulation over the same
microbatches (loss, every gradient, grad norm, loads, expert bias, dropped tokens and the parameters
after two optimizer steps, within 1e-5); with aux/z losses and capacity off also a single full-batch
process. The model is built on the meta device, split, sharded and then materialized, and its
stages get static shapes: the load counters and in-place expert gradients after a step equal the
reference's, so no hidden shape-inference pass ran."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.experts import accumulate_expert_grads_in_place
from moe.loss import IGNORE_INDEX
from moe.model import build_meta_model, build_model, materialize
from moe.parallel.apply import parallelize, shard_model
from moe.parallel.mesh import ParallelDims
from moe.parallel.pipeline import PipelineConfig, rank_stages, split_stages
from tests.moe.distributed import spawn

TOL = {"atol": 1e-5, "rtol": 1e-5}
B_REPLICA, SEQ, LR, MAX_NORM = 4, 8, 0.5, 0.1


def pp_config(**moe: object) -> ModelConfig:
    base = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32, aux_loss_coef=0.1,
                     z_loss_coef=0.01, bias_update_rate=0.05, expert_kernel="loop")
    return ModelConfig(name="pp-test", vocab_size=128, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                       max_seq_len=32, dense_hidden=64, n_dense_layers=1, moe=dataclasses.replace(base, **moe))


def _batch(n_replicas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N, SEQ+1), targets (N, SEQ) with -100 where the loss mask is off)."""
    g = torch.Generator().manual_seed(4321)
    tokens = torch.randint(0, 128, (n_replicas * B_REPLICA, SEQ + 1), generator=g)
    mask = torch.rand(tokens.shape, generator=g) > 0.25
    return tokens, torch.where(mask[:, 1:], tokens[:, 1:], IGNORE_INDEX)


def _reference_step(model, tokens, targets, n_replicas: int, m: int, full_batch: bool) -> torch.Tensor:
    """One process: gradient accumulation over microbatch k = every replica's k-th microbatch (or one
    full-batch pass); loss = sum over valid tokens / their count."""
    count = (targets != IGNORE_INDEX).sum()
    mb = B_REPLICA // m
    chunks = [slice(None)] if full_batch else [
        torch.cat([torch.arange(r * B_REPLICA + k * mb, r * B_REPLICA + (k + 1) * mb) for r in range(n_replicas)])
        for k in range(m)]
    total = torch.zeros(())
    for idx in chunks:
        logits = model(tokens[idx, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), targets[idx].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") / count
        loss.backward()
        total += loss.detach()
    return total


def _sgd(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
            p.grad.zero_()  # in-place expert gradients stay allocated, as in the trainer


def _expert_slice(par, name: str, ref: torch.Tensor) -> torch.Tensor:
    if ".experts.w" not in name:
        return ref
    shard = par.get_submodule(name.rsplit(".", 1)[0]).shard
    return ref[shard.first:shard.first + shard.count]


def _check(rank: int, world: int, dp: int, ep: int, pc: PipelineConfig, moe: dict, full_batch: bool, label: str
           ) -> None:
    cfg = pp_config(**moe)
    dims = ParallelDims.from_degrees(world, dp=dp, ep=ep, pp=2, n_experts=cfg.moe.n_routed_experts)
    n_rep = dims.data_ranks
    tokens, targets = _batch(n_rep)
    serial = build_model(cfg, seed=0)
    par = build_meta_model(cfg)
    plan = parallelize(par, dims, device_type="cpu", pipeline=pc)
    materialize(par, "cpu", seed=0)
    for model in (serial, par):
        accumulate_expert_grads_in_place(model)
    r = dims.data_rank(rank)
    mine = slice(r * B_REPLICA, (r + 1) * B_REPLICA)
    count = int((targets != IGNORE_INDEX).sum())
    pipe = plan.pipeline
    serial_params = dict(serial.named_parameters())
    for step in range(2):
        where = f"{label} step {step} rank {rank}"
        loss_s = _reference_step(serial, tokens, targets, n_rep, pc.microbatches, full_batch)
        loss_p = pipe.step(tokens[mine, :-1], targets[mine], loss_scale=n_rep / count)
        if pipe.is_last:  # each last-stage rank holds n_rep x its replica's share
            total = loss_p.clone() / n_rep
            dist.all_reduce(total, group=plan.mesh.stage_group)
            torch.testing.assert_close(total, loss_s, **TOL, msg=f"loss: {where}")
        plan.sync_gradients()
        for name, p in par.named_parameters():
            ref = _expert_slice(par, name, serial_params[name].grad)
            torch.testing.assert_close(p.grad, ref, **TOL, msg=lambda m, n=name, w=where: f"grad {n}: {w}\n{m}")
        norm_s = torch.nn.utils.clip_grad_norm_(serial.parameters(), MAX_NORM)
        torch.testing.assert_close(plan.clip_grad_norm_(MAX_NORM), norm_s, **TOL, msg=f"grad norm: {where}")
        _sgd(serial)
        _sgd(par)
        _check_balance(plan, serial, where)
    for name, p in par.named_parameters():
        ref = _expert_slice(par, name, serial_params[name].detach())
        torch.testing.assert_close(p.detach(), ref, **TOL, msg=f"param {name} after two steps: {label}")


def _check_balance(plan, serial, where: str) -> None:
    """Loads, bias (identical on every rank of a stage), dropped fractions and aux losses of all layers."""
    loads_s = {name: m.take_load() for name, m in serial.moe_layers().items()}
    dropped_s = {name: m.take_dropped_fraction() for name, m in serial.moe_layers().items()}
    aux_s = serial.aux_losses()
    loads_p = plan.reduce_expert_loads()
    assert set(loads_p) == set(plan.model.moe_layers()), where
    plan.update_expert_bias(loads_p)
    for name, m in serial.moe_layers().items():
        m.router.update_expert_bias(loads_s[name])
    for name, load in loads_p.items():
        torch.testing.assert_close(load, loads_s[name], msg=f"load {name}: {where}")
        bias = plan.model.moe_layers()[name].router.expert_bias
        torch.testing.assert_close(bias, serial.moe_layers()[name].router.expert_bias, msg=f"bias {name}: {where}")
        everyone = [torch.empty_like(bias) for _ in range(dist.get_world_size(plan.mesh.stage_group))]
        dist.all_gather(everyone, bias, group=plan.mesh.stage_group)
        assert all(torch.equal(b, bias) for b in everyone), f"bias differs across a stage: {where}"
    gathered = plan.gather_over_pipeline(loads_p, torch.zeros(serial.cfg.moe.n_routed_experts))
    assert list(gathered) == list(loads_s), where
    for name, load in gathered.items():
        torch.testing.assert_close(load, loads_s[name], msg=f"gathered load {name}: {where}")
    dropped_p = plan.reduce_dropped_fractions()
    assert dropped_p == pytest.approx(dropped_s, abs=1e-9), where
    aux_p = plan.aux_losses()  # the last microbatch's, summed over all layers of all stages
    assert aux_p["aux_loss"] == pytest.approx(aux_s["aux_loss"], rel=1e-5, abs=1e-7), where
    if dist.get_world_size(plan.mesh.stage_group) == 1:  # the z-loss is each rank's own microbatch
        assert aux_p["z_loss"] == pytest.approx(aux_s["z_loss"], rel=1e-5, abs=1e-7), where


SCHEDULES = [PipelineConfig("gpipe", 2), PipelineConfig("1f1b", 4), PipelineConfig("interleaved_1f1b", 2, 2)]


def _run(rank: int, world: int, cases: list) -> None:
    for dp, ep, pc, moe, full_batch, label in cases:
        _check(rank, world, dp, ep, pc, moe, full_batch, label)


def test_pp2_each_schedule_equals_gradient_accumulation_and_full_batch() -> None:
    cases = [(1, 1, pc, {}, False, f"pp2 {pc.schedule}") for pc in SCHEDULES]
    cases += [(1, 1, pc, {"aux_loss_coef": 0.0, "z_loss_coef": 0.0}, True, f"pp2 {pc.schedule} full batch")
              for pc in SCHEDULES]
    spawn(_run, 2, cases)


def test_pp2_x_ep2_and_pp2_x_dp2_each_schedule_equal_one_process() -> None:
    cases = [(1, 2, pc, {"score_func": "sigmoid"}, False, f"pp2xep2 {pc.schedule}") for pc in SCHEDULES]
    cases += [(2, 1, pc, {"capacity_factor": 0.8}, False, f"pp2xdp2 {pc.schedule} capacity") for pc in SCHEDULES]
    cases += [(2, 1, SCHEDULES[1], {"aux_loss_coef": 0.0, "z_loss_coef": 0.0}, True, "pp2xdp2 1f1b full batch")]
    spawn(_run, 4, cases)


def test_stages_balance_cost_and_hold_only_their_layers() -> None:
    cfg = pp_config()
    assert [s.layer_ids for s in split_stages(cfg, 2)] == [(0, 1), (2, 3)]  # the head weighs on the last stage
    assert [s.layer_ids for s in split_stages(cfg, 4)] == [(0,), (1,), (2,), (3,)]
    assert [s.index for s in rank_stages(cfg, 2, 1, virtual_stages=2)] == [1, 3]
    dims = ParallelDims.from_degrees(4, dp=1, ep=2, pp=2, n_experts=8)
    for rank, layers, emb, head in ((0, ["0", "1"], True, False), (3, ["2", "3"], False, True)):
        model = build_meta_model(cfg)
        shard_model(model, dims, rank, PipelineConfig("1f1b", 2))
        assert list(model.layers) == layers and (model.tok_emb is not None) == emb and (model.head is not None) == head
        assert all(m.experts.w1.shape[0] == 4 for m in model.moe_layers().values())


@pytest.mark.parametrize(("pc", "pp", "n_layers", "message"), [
    (PipelineConfig("1f1b", 1), 2, 4, "pp_microbatches>=2"),
    (PipelineConfig("interleaved_1f1b", 4, 1), 2, 4, "pp_virtual_stages=2"),
    (PipelineConfig("gpipe", 2, 2), 2, 4, "needs parallel.pp_schedule=interleaved_1f1b"),
    (PipelineConfig("interleaved_1f1b", 3, 2), 2, 4, "pp_microbatches=4"),
    (PipelineConfig("gpipe", 2), 4, 3, "cannot be split into 4 pipeline stages"),
    (PipelineConfig("zero_bubble", 2), 2, 4, "pp_schedule='zero_bubble'"),
])
def test_pipeline_config_errors_name_the_fix(pc: PipelineConfig, pp: int, n_layers: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pc.validate(pp, n_layers)


def _stuck_peer(rank: int, world: int) -> None:
    import time

    from moe.parallel.pipeline import PipelineCommError

    model = build_meta_model(pp_config())
    plan = parallelize(model, ParallelDims.from_degrees(world, pp=2), device_type="cpu",
                       pipeline=PipelineConfig("gpipe", 2, timeout_s=2))
    materialize(model, "cpu", seed=0)
    tokens, targets = _batch(1)
    plan.pipeline.step(tokens[:, :-1], targets, loss_scale=1.0)  # one step together
    if rank == 1:  # then stage 1 is stuck: it never takes part in the next step
        time.sleep(5)
        return
    t0 = time.perf_counter()
    with pytest.raises(PipelineCommError) as err:
        plan.pipeline.step(tokens[:, :-1], targets, loss_scale=1.0)
    message = str(err.value)
    assert "stage 0 (global rank 0) waiting to send activations to stage 1 (global rank 1)" in message, message
    assert "parallel.pp_timeout_s" in message and time.perf_counter() - t0 < 30, message


def test_a_stuck_stage_times_out_naming_the_stage_and_the_peer() -> None:
    spawn(_stuck_peer, 2)
