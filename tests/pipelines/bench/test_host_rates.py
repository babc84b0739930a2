"""pipelines/bench/host_rates.py: the dispatch-mode tape of a training step's other operations (no matrix
product, no collective, DTensor operations as such), its replay, and the probe the planner bench samples."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from moe.parallel.mesh import ParallelDims
from pipelines.bench.host_rates import (
    COLLECTIVE_NAMESPACES,
    MATRIX_OPS,
    HostProbe,
    build_training_model,
    lm_loss,
)
from pipelines.bench.planner import model_config
from tests.moe.distributed import spawn

CFG = model_config(32, 2)  # the bench's model family at a tiny width


def _recorded_step(dims: ParallelDims, probe: HostProbe, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    model, plan, opt = build_training_model(CFG, dims, "none")
    tokens = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(seed))
    lm_loss(model, tokens).backward()
    plan.sync_gradients()
    opt.step()
    with probe.tape:
        lm_loss(model, tokens).backward()
    return model, tokens


def _names(probe: HostProbe) -> set[str]:
    return {str(func.overloadpacket) for func, _, _ in probe.tape.ops}


def test_tape_holds_the_other_operations_and_replays_them_without_touching_the_weights() -> None:
    torch.manual_seed(0)
    probe = HostProbe(CFG, 4, 16, tp=1, ep=1)
    model, _ = _recorded_step(ParallelDims.from_degrees(1, 1, 1, 1, CFG.moe.n_routed_experts), probe, seed=0)
    names = _names(probe)
    assert not names & MATRIX_OPS  # timed by the matrix pass instead
    assert {"aten.silu", "aten.topk", "aten._log_softmax", "aten.index_add_"} <= names  # elementwise, routing, loss
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probe.sample()
    probe.sample()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    flops, other_per_token, adamw = probe.medians()
    assert flops > 0 and other_per_token > 0 and adamw > 0


def _distributed(rank: int, world: int) -> None:
    for dp, ep, tp in ((1, 2, 1), (1, 1, 2)):
        probe = HostProbe(CFG, 4, 16, tp=tp, ep=ep)
        _recorded_step(ParallelDims.from_degrees(world, dp, ep, 1, CFG.moe.n_routed_experts, tp=tp), probe, seed=rank)
        assert not {func.namespace for func, _, _ in probe.tape.ops} & COLLECTIVE_NAMESPACES
        assert not _names(probe) & MATRIX_OPS
        with_dtensor = [f for f, args, _ in probe.tape.ops
                        if any(isinstance(a, DTensor) for a in torch.utils._pytree.tree_leaves(args))]
        assert bool(with_dtensor) == (tp > 1)  # under tp the replay pays DTensor's own dispatch
        probe.sample()  # every rank replays at once: no collective to wait on, none to mismatch


def test_tape_leaves_out_collectives_and_keeps_dtensor_operations_on_two_gloo_ranks() -> None:
    spawn(_distributed, 2)
