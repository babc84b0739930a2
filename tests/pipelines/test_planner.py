"""The planner against numbers computed by hand (the formulas of pipelines/train/planner.py's docstring
written out for the 16B and 67B presets on every GPU profile), its config errors, the dry run's
lines, and parallel=auto's choices for world sizes 1, 2, 8 and 64."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.flops import flops_per_token
from moe.model import build_meta_model, materialize
from moe.parallel.apply import parallelize
from moe.parallel.mesh import ParallelDims
from pipelines.train.config import compose_train_config, planner_inputs
from pipelines.train.plan import make_plan
from pipelines.train.planner import (
    GIB,
    HostRates,
    Layout,
    candidate_layouts,
    choose_layout,
    describe,
    estimate,
    tp_all_reduces_per_layer,
)
from tests.moe.distributed import spawn

# profile: (GB per device, peak FLOP/s, intra-node B/s, inter-node B/s)
PROFILES = {"a100": (80, 312e12, 300e9, 25e9), "h100": (80, 989e12, 450e9, 50e9),
            "mi250": (64, 191.5e12, 100e9, 25e9), "mi300x": (192, 1307e12, 448e9, 50e9)}
# per-collective latency in seconds over 8 ranks, NCCL's (NVIDIA) and RCCL's (AMD) ring/LL cost model:
# base + steps x hop (all-reduce 14 steps, all-to-all 7), hop inside a node / across nodes
NCCL = {"ar intra": (6.6 + 14 * 0.6) * 1e-6, "a2a intra": (6.6 + 7 * 0.6) * 1e-6,
        "ar inter": (6.6 + 14 * 2.7) * 1e-6, "a2a inter": (6.6 + 7 * 2.7) * 1e-6}
RCCL = {"ar intra": (12.0 + 14 * 0.8) * 1e-6, "a2a intra": (12.0 + 7 * 0.8) * 1e-6,
        "ar inter": (12.0 + 14 * 9.5) * 1e-6, "a2a inter": (12.0 + 7 * 9.5) * 1e-6}
LATENCY = {"a100": NCCL, "h100": NCCL, "mi250": RCCL, "mi300x": RCCL}
HBM = {"a100": 2039e9, "h100": 3350e9, "mi250": 1638.4e9, "mi300x": 5300e9}  # B/s: the AdamW step's 28 B/parameter
SEQ = ["data.seq_len=2048", "train.micro_batch_size=1"]


def _cfg(*overrides: str):
    return compose_train_config([*SEQ, *overrides])


# ---- deepseek_moe_16b, dp=1 ep=8 (8 devices, one node): d=2048 L=28 H=KV=16 V=102400 F=10944 E=64 S=2 k=6 He=1408
P16_ATTN = 2 * 2048 * 2048 + 2 * 2048 * 2048 + 2 * 2048  # q,o + k,v (16 kv heads) + two norms
P16_DENSE = P16_ATTN + 3 * 2048 * 10944
P16_ROUTED = 3 * 2048 * 1408 * (64 // 8)  # 8 of the 64 experts
P16_MOE = P16_ATTN + 2048 * 64 + 3 * 2048 * 2 * 1408 + P16_ROUTED
P16 = P16_DENSE + 27 * P16_MOE + 2 * 102400 * 2048 + 2048  # embedding, head, final norm
# activations per token (bf16, grouped GEMM): attention 9d + 2kv + H; dense 4F + 2;
# MoE 2E + k (d + 5He + 8) + 4 S He + 4 + min(k, ep) d; embedding d + 1; norm + log-softmax 2d + V + 4
A16_COMMON = 9 * 2048 + 2 * 2048 + 16
A16 = (A16_COMMON + 4 * 10944 + 2) + 27 * (A16_COMMON + 2 * 64 + 6 * (2048 + 5 * 1408 + 8) + 4 * 2 * 1408 + 4
                                           + 6 * 2048) + (2048 + 1) + (2 * 2048 + 102400 + 4)


def test_hand_numbers_are_what_the_dry_run_counts() -> None:
    assert P16 == 3_295_791_104  # the meta-built model's count per rank (plan "per rank" line)
    assert A16 == 2_896_579
    plan = make_plan(_cfg("model=deepseek_moe_16b", "+cluster=h100", "parallel.ep=8"))
    assert plan.memory.params == P16 == plan.estimate.memory.params // 4


@pytest.mark.parametrize("profile", PROFILES)
def test_16b_ep8_memory_and_step_time_by_hand(profile: str) -> None:
    gb, peak, intra, _ = PROFILES[profile]
    cfg = _cfg("model=deepseek_moe_16b", f"+cluster={profile}")
    workload, _ = planner_inputs(cfg)
    est = estimate(workload, Layout(dp=1, ep=8), cfg.cluster)
    m = est.memory
    assert (m.params, m.grads, m.optimizer) == (4 * P16, 4 * P16, 8 * P16)
    assert m.activations == A16 * 2048 * 2
    in_flight = 2 * 2048 * 6 * 2048 * 2  # the all-to-all's send and receive rows (bf16)
    grad_buffer = 4 * 27 * P16_ROUTED  # the flat expert-gradient buffer is the larger bucket
    assert m.comm_buffers == grad_buffer
    transient = 2048 * 102400 * 2 + 102400 * 2048 * 4  # the logits' gradient, the head's fresh weight gradient
    assert m.backward_transient == transient
    assert m.peak == 16 * P16 + max(A16 * 2048 * 2 + in_flight + transient, grad_buffer) == 65_955_999_744
    assert est.capacity == int(gb * GIB * 0.9)
    assert est.fits == (profile != "mi250")  # 61.4 GiB: over MI250's 57.6 GiB usable
    t, lat = est.time, LATENCY[profile]
    assert t.compute_s == pytest.approx(2048 * flops_per_token(workload.model, 2048) / (peak * 0.4))
    # one node (NVLink/IF): per MoE layer 4 transfers of the routed rows, 8 all-to-alls (5 forward, 3 backward)
    assert t.all_to_all_s == pytest.approx(27 * (4 * 2048 * 6 * 7 / 8 * 2048 * 2 / intra + 8 * lat["a2a intra"]))
    # the non-expert gradients' all-reduce, plus the router statistics' all-reduce per MoE layer forward and
    # backward, plus the sync's local passes: 24 bytes per flattened (non-expert) and 8 per expert parameter
    assert t.dp_s == pytest.approx(2 * 7 / 8 * 4 * (P16 - 27 * P16_ROUTED) / intra + (1 + 2 * 27) * lat["ar intra"]
                                   + (24 * (P16 - 27 * P16_ROUTED) + 8 * 27 * P16_ROUTED) / HBM[profile])
    assert t.tp_s == t.bubble_s == t.pp_send_s == 0
    assert t.optimizer_s == pytest.approx(P16 * 28 / HBM[profile])
    assert est.tokens_per_s == pytest.approx(8 * 2048 / t.total_s)


def test_16b_that_does_not_fit_is_a_config_error_naming_term_and_knob() -> None:
    with pytest.raises(ConfigError, match=r"layout dp=1 tp=1 pp=1 ep=8 needs 61.4 GiB per device but mi250's 64 GB "
                       r"leaves 57.6 GiB usable; the largest term is optimizer states \(24.6 GiB\): raise parallel.ep"):
        make_plan(_cfg("model=deepseek_moe_16b", "+cluster=mi250", "parallel.ep=8"))
    with pytest.raises(ConfigError, match=r"largest term is activations .*set train.activation_checkpointing=moe"):
        make_plan(compose_train_config(["model=deepseek_moe_16b", "+cluster=mi300x", "parallel.ep=8",
                                        "data.seq_len=4096", "train.micro_batch_size=8"]))
    plan = make_plan(compose_train_config(["model=deepseek_moe_16b", "+cluster=mi300x", "parallel.ep=8",
                                           "data.seq_len=4096", "train.micro_batch_size=8",
                                           "train.activation_checkpointing=full"]))
    assert plan.estimate.fits and "activation_checkpointing=full" in "\n".join(plan.lines())


# ---- moe_67b, dp=1 tp=8 ep=8 (64 devices): d=4096 L=32 H=32 KV=8 hd=128 V=102400 F=12288 E=128 S=2 k=8 He=1280
P67_ATTN = (2 * 4096 * 4096 + 2 * 4096 * 1024) // 8 + 2 * 4096
P67_ROUTED = 3 * 4096 * 1280 * (128 // 8)
P67 = (P67_ATTN + 3 * 4096 * 12288 // 8) + 31 * (P67_ATTN + 4096 * 128 + 3 * 4096 * 2 * 1280 // 8 + P67_ROUTED) \
    + 2 * 102400 * 4096 + 4096
A67_COMMON = 5 * 4096 + (4 * 4096 + 2 * 1024 + 32) // 8
A67 = (A67_COMMON + 4 * 12288 // 8 + 2) + 31 * (A67_COMMON + 2 * 128 + 8 * (4096 + 5 * 1280 + 8) + 4 * 2 * 1280 // 8
                                                + 4 + 8 * 4096) + (4096 + 1) + (2 * 4096 + 102400 + 4)


@pytest.mark.parametrize("profile", PROFILES)
def test_67b_tp8_ep8_by_hand(profile: str) -> None:
    gb, peak, intra, inter = PROFILES[profile]
    cfg = compose_train_config(["model=moe_67b", f"+cluster={profile}", *SEQ])
    workload, _ = planner_inputs(cfg)
    est = estimate(workload, Layout(dp=1, tp=8, ep=8), cfg.cluster)
    m = est.memory
    assert P67 == 8_965_328_896 and m.params == 4 * P67 and m.optimizer == 8 * P67
    assert A67 == 4_518_595 and m.activations == A67 * 2048 * 2
    grad_buffer = 4 * 31 * P67_ROUTED
    transient = 2048 * 102400 * 2 + 102400 * 4096 * 4
    assert m.peak == 16 * P67 + max(A67 * 2048 * 2 + 2 * 2048 * 8 * 4096 * 2 + 2048 * 4096 * 2 + transient,
                                    grad_buffer)
    assert m.peak == 174_650_884_096  # 162.7 GiB: only MI300X's 172.8 GiB usable holds it
    assert est.fits == (profile == "mi300x")
    t, lat = est.time, LATENCY[profile]
    # tp does not split the router, the routed experts (8 of 128 per token) and the head: each tp rank runs them
    replicated = 6 * (31 * (4096 * 128 + 3 * 4096 * 1280 * 8) + 102400 * 4096)
    per_token = flops_per_token(workload.model, 2048)
    assert t.compute_s == pytest.approx(2048 * ((per_token - replicated) / 8 + replicated) / (peak * 0.4))
    # tp=8 inside a node: 7 all-reduces per layer (wo, w2 forward; wq, wk, wv, w1, w3 backward), 32 layers
    assert t.tp_s == pytest.approx(7 * 32 * (2 * 7 / 8 * 2048 * 4096 * 2 / intra + lat["ar intra"]))
    # ep spans 64 ranks (8 nodes): the network
    assert t.all_to_all_s == pytest.approx(31 * (4 * 2048 * 8 * 7 / 8 * 4096 * 2 / inter + 8 * lat["a2a inter"]))
    assert t.dp_s == pytest.approx(2 * 7 / 8 * 4 * (P67 - 31 * P67_ROUTED) / inter + (1 + 2 * 31) * lat["ar inter"]
                                   + (24 * (P67 - 31 * P67_ROUTED) + 8 * 31 * P67_ROUTED) / HBM[profile])
    assert t.optimizer_s == pytest.approx(P67 * 28 / HBM[profile])


def test_recomputation_is_counted() -> None:
    workload, layout = planner_inputs(_cfg("model=deepseek_moe_16b", "+cluster=h100", "parallel.ep=8"))
    cluster = _cfg("model=deepseek_moe_16b", "+cluster=h100").cluster
    acts = {}
    for mode in ("none", "moe", "full"):
        w = type(workload)(workload.model, workload.seq_len, workload.micro_batch_size, mode)
        acts[mode] = estimate(w, layout, cluster)
    moe_ffn = A16 - (A16_COMMON + 4 * 10944 + 2) - (2048 + 1) - (2 * 2048 + 102400 + 4) - 27 * A16_COMMON
    assert acts["moe"].memory.activations == (A16 - moe_ffn + moe_ffn // 27) * 2048 * 2  # one layer recomputed
    dense = A16_COMMON + 4 * 10944 + 2
    assert acts["full"].memory.activations == (28 * 2048 + (2048 + 1) + (2 * 2048 + 102400 + 4)
                                               + max(dense, A16_COMMON + moe_ffn // 27)) * 2048 * 2
    assert acts["none"].time.compute_s < acts["moe"].time.compute_s < acts["full"].time.compute_s


@pytest.mark.parametrize(("world", "overrides", "chosen"), [
    (1, ["model=tiny", "data=tiny", "+cluster=h100"], Layout(dp=1)),
    # small on h100, all latency: pp=2 (0.39 ms a step for one batch: half the compute, a 1/2 bubble of it,
    # 4 sends) edges out dp=2 (0.80 ms for two: the gradient all-reduce and the sync's passes over the
    # gradients, 0.31 ms) and ep=2 (0.84 ms for two: 24 all-to-alls, 3 MoE layers x 8)
    (2, ["model=small", "+cluster=h100"], Layout(dp=1, pp=2)),
    (8, ["model=deepseek_moe_16b", "+cluster=h100"], Layout(dp=1, pp=2, ep=4)),
    (64, ["model=moe_67b", "+cluster=h100"], Layout(dp=1, pp=8, ep=8, microbatches=8)),
])
def test_parallel_auto_choices(world: int, overrides: list[str], chosen: Layout) -> None:
    cfg = compose_train_config([*overrides, "parallel=auto", f"cluster.num_workers={world}"])
    p = cfg.parallel
    assert Layout(p.dp, p.tp, p.pp, p.ep, p.pp_microbatches) == chosen
    workload, layout = planner_inputs(cfg)
    ests = [estimate(workload, lay, cfg.cluster) for lay in candidate_layouts(workload, cfg.cluster, world, layout)]
    best = estimate(workload, layout, cfg.cluster)
    assert best.fits and all(e.tokens_per_s <= best.tokens_per_s for e in ests if e.fits)  # the fastest that fits
    assert all(e.layout.tp <= 8 for e in ests)  # tp stays within a node
    lines = "\n".join(make_plan(cfg).lines())
    assert f"auto           {chosen.describe()}" in lines and "fastest predicted" in lines
    if world == 64:
        assert "do not fit, e.g." in lines


def test_parallel_auto_with_too_few_devices_names_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"no layout of 2 devices fits deepseek_moe_16b on h100 .* largest term "
                                          r"optimizer states .*add workers \(cluster.num_workers\)"):
        compose_train_config(["model=deepseek_moe_16b", "+cluster=h100", "parallel=auto", "cluster.num_workers=2"])
    local = compose_train_config(["model=tiny", "data=tiny"])
    layout, why = choose_layout(planner_inputs(local)[0], local.cluster, 4)
    assert layout.world == 4 and why[0].startswith("auto")  # local CPU: no memory limit, no peak: least memory


# ---- the planner's collective counts against what the code issues (real gloo ranks) -----------------
COUNT_CFG = ModelConfig(name="count", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16,
                        dense_hidden=64, n_dense_layers=1,
                        moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden=16,
                                      expert_kernel="loop"))


def _count_collectives(rank: int, world: int, tp: int, ep: int, out_file: str) -> None:
    dims = ParallelDims.from_degrees(world, world // (tp * ep), ep, 1, COUNT_CFG.moe.n_routed_experts, tp=tp)
    model = build_meta_model(COUNT_CFG)
    parallelize(model, dims, device_type="cpu")
    materialize(model, "cpu", seed=0)
    tokens = torch.randint(0, COUNT_CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(rank))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    if rank == 0:
        Path(out_file).write_text(json.dumps({"tp": counts.get("_c10d_functional::all_reduce", 0),
                                              "a2a": counts.get("c10d::alltoall_base_", 0),
                                              "all_reduce": counts.get("c10d::allreduce_", 0)}))


def test_collective_counts_are_what_the_code_issues(tmp_path: Path) -> None:
    """tp=2 x ep=2 on 4 gloo ranks, one forward and backward: what rank 0 issues is what the planner counts."""
    spawn(_count_collectives, 4, 2, 2, str(tmp_path / "counts.json"))
    counts = json.loads((tmp_path / "counts.json").read_text())
    # tp: 7 all-reduces per layer (every layer splits its feed-forward: the dense one or the shared experts)
    assert counts["tp"] == sum(tp_all_reduces_per_layer(COUNT_CFG, i) for i in range(3)) == 21
    # ep: 8 all-to-alls per MoE layer; the router statistics: one all-reduce per MoE layer forward and backward
    # (c10d::allreduce_ also counts the tp all-reduces it carries out)
    assert (counts["a2a"], counts["all_reduce"] - counts["tp"]) == (8 * 2, 2 * 2)


def test_a_measured_host_replaces_peak_times_mfu_and_adds_its_other_operations() -> None:
    local = compose_train_config(["model=tiny", "data=tiny"])
    workload, _ = planner_inputs(local)
    assert estimate(workload, Layout(dp=1), local.cluster).time is None  # CPU profile: no peak, nothing measured
    host = HostRates(matmul_flops=5e10, other_s_per_token=2e-6)
    cluster = dataclasses.replace(local.cluster, memory_gbps=10.0)
    tokens = workload.micro_batch_size * workload.seq_len
    one = estimate(workload, Layout(dp=1), cluster, host=host).time
    assert one.compute_s == pytest.approx(tokens * flops_per_token(workload.model, workload.seq_len) / 5e10)
    assert one.other_ops_s == pytest.approx(tokens * 2e-6)
    assert one.total_s == pytest.approx(one.compute_s + one.other_ops_s + one.optimizer_s)
    piped = estimate(workload, Layout(dp=1, pp=2), cluster, host=host).time
    assert piped.other_ops_s == pytest.approx(tokens * 2e-6 / 2)  # each stage runs its layers' share
    assert "other ops" in describe(estimate(workload, Layout(dp=1), cluster, host=host))[1]
