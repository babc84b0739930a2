"""Training checkpoints reshard: written under EP=2, read back under DP=2 (EP=1) and in one process,
with model weights and AdamW moments equal to what the EP run held (real gloo ranks)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from moe.checkpoint import load_checkpoint, load_full_model, save_checkpoint
from moe.config import ModelConfig, MoEConfig
from moe.model import build_model
from moe.parallel.apply import parallelize
from moe.parallel.mesh import ParallelDims
from tests.moe.distributed import gather_full_state, spawn

CFG = ModelConfig(name="ckpt", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                  dense_hidden=64, n_dense_layers=1,
                  moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden=16))
EXPERT_KEY = "layers.1.ffn.experts.w1"


def _train_one_step(model, plan, rank: int) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=g)
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    plan.sync_gradients()
    opt.step()
    return opt


def _write_under_ep2(rank: int, world: int, out: str) -> None:
    model = build_model(CFG, seed=0)
    plan = parallelize(model, ParallelDims.from_degrees(world, ep=2, n_experts=4), device_type="cpu")
    opt = _train_one_step(model, plan, rank)
    save_checkpoint(model, opt, Path(out), {"step": 1}, rank)
    full = gather_full_state(model, plan.mesh.ep_group)
    local_moment = opt.state[dict(model.named_parameters())[EXPERT_KEY]]["exp_avg"]
    parts = [torch.empty_like(local_moment) for _ in range(world)]
    dist.all_gather(parts, local_moment)
    if rank == 0:
        torch.save({"model": full, "exp_avg": torch.cat(parts)}, Path(out) / "expected.pt")


def _read_under_dp2(rank: int, world: int, out: str) -> None:
    model = build_model(CFG, seed=1)  # different init: everything must come from the checkpoint
    plan = parallelize(model, ParallelDims.from_degrees(world, ep=1), device_type="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra = load_checkpoint(model, opt, Path(out))
    expected = torch.load(Path(out) / "expected.pt")
    assert extra == {"step": 1}
    for key, value in gather_full_state(model, plan.mesh.ep_group).items():
        torch.testing.assert_close(value, expected["model"][key], rtol=0, atol=0, msg=key)
    moment = opt.state[dict(model.named_parameters())[EXPERT_KEY]]["exp_avg"]
    torch.testing.assert_close(moment, expected["exp_avg"], rtol=0, atol=0)


def test_checkpoint_written_under_ep2_loads_under_dp2_and_in_one_process(tmp_path: Path) -> None:
    spawn(_write_under_ep2, 2, str(tmp_path))
    spawn(_read_under_dp2, 2, str(tmp_path))
    expected = torch.load(tmp_path / "expected.pt")
    model = load_full_model(CFG, tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected["model"][key], rtol=0, atol=0, msg=key)
