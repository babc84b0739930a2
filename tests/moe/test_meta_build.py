"""Models are built on the meta device, parallelized there, and only each rank's shard is allocated:
no rank ever holds the whole model, and the shards it materializes are exactly the slices of the
one-device initialization for the same seed (real gloo ranks for the parallelize path)."""

from __future__ import annotations

import dataclasses

import torch

from moe.config import ModelConfig, MoEConfig
from moe.experts import GroupedExperts
from moe.model import build_meta_model, build_model, materialize
from moe.parallel.apply import parallelize, shard_model
from moe.parallel.mesh import ParallelDims
from pipelines.train.config import to_train_config
from pipelines.train.plan import rank_memory
from tests.moe.distributed import gather_full_state, spawn

CFG = ModelConfig(name="meta", vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32,
                  dense_hidden=64, n_dense_layers=1,
                  moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=16))


def _expert_elements(model: torch.nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())


def test_deepseek_16b_on_meta_under_ep8_each_rank_holds_only_its_share(compose) -> None:
    cfg = to_train_config(compose("train", ["model=deepseek_moe_16b"])).model
    whole = build_meta_model(cfg)
    total, experts = sum(p.numel() for p in whole.parameters()), _expert_elements(whole)
    assert experts > 0.9 * total  # the experts are what EP must split
    dims = ParallelDims.from_degrees(8, dp=1, ep=8, n_experts=cfg.moe.n_routed_experts)
    for rank in range(8):
        model = build_meta_model(cfg)
        shard_model(model, dims, rank)
        held = sum(p.numel() for p in model.parameters())
        assert held == total - experts + experts // 8, rank
        assert all(p.is_meta for p in model.parameters()), "sharding on meta allocated memory"
        for moe in model.moe_layers().values():
            shard = moe.experts.shard
            assert (shard.first, shard.count, shard.total) == (rank * 8, 8, 64)
            assert moe.experts.w1.shape[0] == 8
    memory = rank_memory(cfg, dims)
    assert memory.params == total - experts + experts // 8
    assert memory.param_bytes == 4 * memory.params and memory.optim_bytes == 2 * memory.param_bytes
    assert memory.total_bytes < 80 * 1024 ** 3 < 16 * total  # fits an 80 GB GPU; the whole model would not


def test_simulated_ep4_shards_are_slices_of_the_one_device_init() -> None:
    full = build_model(CFG, seed=3).state_dict()
    dims = ParallelDims.from_degrees(4, dp=1, ep=4, n_experts=8)
    for rank in range(4):
        model = build_meta_model(CFG)
        shard_model(model, dims, rank)
        materialize(model, "cpu", seed=3)
        for key, value in model.state_dict().items():
            expected = full[key]
            if key.endswith(tuple(f"experts.{n}" for n in GroupedExperts.PARAM_NAMES)):
                expected = expected[2 * rank:2 * rank + 2]
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=f"{key} rank {rank}")


def _parallelize_on_meta(rank: int, world: int, dp: int, ep: int) -> None:
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, capacity_factor=0.0))
    model = build_meta_model(cfg)
    plan = parallelize(model, ParallelDims.from_degrees(world, dp=dp, ep=ep, n_experts=8), device_type="cpu")
    materialize(model, "cpu", seed=11)
    assert model.layers["1"].ffn.experts.w1.shape[0] == 8 // ep  # only the local experts were allocated
    reference = build_model(cfg, seed=11).state_dict()
    full = gather_full_state(model, plan.mesh.ep_group)
    assert full.keys() == reference.keys()
    for key, value in full.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=f"{key} rank {rank}")
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():  # the materialized parallel model computes what the one-device model does
        torch.testing.assert_close(model(tokens), build_model(cfg, seed=11)(tokens), atol=1e-5, rtol=1e-5)


def test_parallelize_on_meta_then_materialize_equals_one_device_init() -> None:
    spawn(_parallelize_on_meta, 2, 1, 2)


def test_pipeline_stages_split_the_model_and_the_plan_counts_data_parallel_ranks(compose) -> None:
    """Under pp each rank holds only its stage (the stages add up to the whole model, EP inside them);
    the dry-run plan's global batch is micro x dp x ep and its memory line is the largest stage's."""
    from moe.parallel.pipeline import PipelineConfig
    from pipelines.train.plan import make_plan

    cfg = dataclasses.replace(CFG, n_layers=4)
    total = sum(p.numel() for p in build_meta_model(cfg).parameters())
    dims = ParallelDims.from_degrees(4, dp=1, ep=2, pp=2, n_experts=8)
    per_stage = [rank_memory(cfg, dims, rank, PipelineConfig("1f1b", 2)) for rank in (0, 2)]
    whole_stages = [rank_memory(cfg, ParallelDims.from_degrees(2, dp=1, pp=2), r, PipelineConfig("1f1b", 2))
                    for r in (0, 1)]
    assert sum(m.params for m in whole_stages) == total  # nothing held twice, nothing lost
    assert all(m.params < w.params for m, w in zip(per_stage, whole_stages, strict=True))  # experts split by ep
    train_cfg = to_train_config(compose("train", [
        "model=tiny", "data=tiny", "data.seq_len=64", "parallel=pp2_ep2", "cluster.num_workers=8", "train.micro_batch_size=4"]))
    plan = make_plan(train_cfg)
    assert (plan.dims.dp, plan.dims.ep, plan.dims.pp) == (2, 2, 2)
    assert plan.global_batch == 4 * 2 * 2 and plan.tokens_per_step == 16 * 64
    stage_params = [rank_memory(train_cfg.model, plan.dims, r, PipelineConfig("1f1b", 2)).params for r in (0, 4)]
    assert plan.memory.params == max(stage_params)
    assert "stages (layers) 0 | 1" in "\n".join(plan.lines())
