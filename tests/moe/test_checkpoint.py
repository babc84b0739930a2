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


# ---- pipeline stages: name-keyed optimizer state, resharding pp=2 <-> pp=1 <-> ep=2 ---------------
PP_CFG = ModelConfig(name="ckpt-pp", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                     dense_hidden=64, n_dense_layers=1,  # pp=2: stage 0 holds only the dense layer
                     moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden=16))


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Two groups with different lr, betas and weight decay: a load must restore them per parameter."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1, "lr": 1e-2, "betas": (0.8, 0.9)},
                              {"params": vectors, "weight_decay": 0.0, "lr": 3e-3, "betas": (0.7, 0.95)}])


def _flat_state(model, opt) -> dict[str, object]:
    """Everything a checkpoint holds, by name, experts one entry per global expert."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from moe.checkpoint import OPTIM_OPTIONS, expert_offsets, to_global_layout

    out = {}
    for part, entries in to_global_layout(*get_state_dict(model, opt, options=OPTIM_OPTIONS),
                                          expert_offsets(model)).items():
        for key, value in entries.items():
            items = value.items() if isinstance(value, dict) else [("", value)]
            for sub, v in items:
                out[f"{part}/{key}/{sub}"] = v.detach().clone() if torch.is_tensor(v) else v
    return out


def _assert_same(got: dict, expected: dict, exact_keys: bool) -> None:
    assert got.keys() <= expected.keys(), sorted(got.keys() - expected.keys())[:5]
    if exact_keys:
        assert got.keys() == expected.keys(), sorted(expected.keys() - got.keys())[:5]
    for key, value in got.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
        else:
            assert value == expected[key], key


def _build(world: int, rank: int, pp: int, ep: int):
    from moe.model import build_meta_model, materialize
    from moe.parallel.pipeline import PipelineConfig

    model = build_meta_model(PP_CFG)
    plan = parallelize(model, ParallelDims.from_degrees(world, ep=ep, pp=pp, n_experts=4), device_type="cpu",
                       pipeline=PipelineConfig("1f1b", 2))
    materialize(model, "cpu", seed=5 + rank)  # differs per rank: everything must come from the checkpoint
    return model, plan, _optimizer(model)


def _write_under_pp2(rank: int, world: int, out: str) -> None:
    model, plan, opt = _build(world, rank, pp=2, ep=1)
    assert (model.layers.keys(), not model.moe_layers()) == ({"0"}, True) if rank == 0 else True
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, PP_CFG.vocab_size, (4, 9), generator=g)
    plan.pipeline.step(tokens[:, :-1], tokens[:, 1:], loss_scale=1 / tokens[:, 1:].numel())
    plan.sync_gradients()
    plan.clip_grad_norm_(1.0)
    opt.step()
    plan.update_expert_bias(plan.reduce_expert_loads())  # a stage without experts takes part
    save_checkpoint(model, opt, Path(out) / "pp2", {"step": 1}, rank)
    torch.save(_flat_state(model, opt), Path(out) / f"expected{rank}.pt")


def _read_under(rank: int, world: int, out: str, src: str, pp: int, ep: int, save_to: str | None) -> None:
    model, _, opt = _build(world, rank, pp=pp, ep=ep)
    assert load_checkpoint(model, opt, Path(out) / src) == {"step": 1}
    expected = torch.load(Path(out) / "expected.pt", weights_only=False)
    _assert_same(_flat_state(model, opt), expected, exact_keys=world == 1)
    if save_to:
        save_checkpoint(model, opt, Path(out) / save_to, {"step": 1}, rank)


def test_checkpoint_reshards_pp2_to_pp1_to_ep2_and_back_with_name_keyed_optimizer_state(tmp_path: Path) -> None:
    spawn(_write_under_pp2, 2, str(tmp_path))
    expected = {**torch.load(tmp_path / "expected0.pt", weights_only=False),
                **torch.load(tmp_path / "expected1.pt", weights_only=False)}
    assert any(k.startswith("optim/param_groups.") and k.endswith(".lr/") for k in expected)
    torch.save(expected, tmp_path / "expected.pt")
    _read_under(0, 1, str(tmp_path), "pp2", pp=1, ep=1, save_to=None)  # one process, the whole model
    spawn(_read_under, 2, str(tmp_path), "pp2", 1, 2, "ep2")  # ep=2 reads it and writes its own
    spawn(_read_under, 2, str(tmp_path), "ep2", 2, 1, None)  # and back under pp=2
    for src in ("pp2", "ep2"):  # the exported (one-process) model is the same from either layout
        model = load_full_model(PP_CFG, tmp_path / src)
        for key, value in model.state_dict().items():
            if key.endswith(tuple(f"experts.{n}" for n in ("w1", "w2", "w3"))):
                parts = [expected[f"model/{key}/expert{e}"] for e in range(value.shape[0])]
                torch.testing.assert_close(value, torch.stack(parts), rtol=0, atol=0, msg=f"{src} {key}")
            else:
                torch.testing.assert_close(value, expected[f"model/{key}/"], rtol=0, atol=0, msg=f"{src} {key}")
