"""`python -m pipelines.bench moe`: MoE layer forward+backward throughput, all ratios from one run.

Measured on one thread per process (the CPU figures of the issue), side by side and interleaved
(each round times every candidate once; the median over rounds is kept), so machine load drifts
hit all candidates alike; goals use wall time, process CPU time is shown next to it:
  - our MoE layer (sorted dispatch + grouped experts) vs a dense SwiGLU with the same active
    parameters (hidden = top_k * expert_hidden) and vs the common per-expert masked loop (the
    Hugging Face Mixtral block's dispatch: one-hot mask, `torch.where` per expert, `index_add_`);
  - step time as n_experts grows 8 -> 64 at fixed active parameters (same top_k and expert size);
  - expert parallelism: EP=2 (two spawned gloo processes, experts split, all-to-all) vs EP=1 (one
    process holding all experts), same per-worker batch; aggregate tokens/s.
Default shape: DeepSeek-MoE-16B's layer (d_model 2048, expert_hidden 1408, 64 experts top-6, no
shared experts so only the routed path is measured) scaled by 1/2 in width; router, aux loss and
z-loss included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moe.config import ModelConfig, MoEConfig
from moe.experts import accumulate_expert_grads_in_place
from moe.layers import SwiGLU
from moe.moe import MoE
from pipelines.bench import BenchResult, Goal, median_time


def _layer_config(args: argparse.Namespace, n_experts: int, kernel: str = "auto") -> ModelConfig:
    return ModelConfig(d_model=args.d_model, moe=MoEConfig(
        n_routed_experts=n_experts, n_shared_experts=0, top_k=args.top_k, expert_hidden=args.expert_hidden,
        expert_kernel=kernel))


class MaskedLoopMoE(MoE):
    """Same router, weights and losses; dispatch as in Hugging Face's Mixtral sparse MoE block."""

    def dispatch_combine(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        ex = self.experts
        final_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(topk_idx_TK, num_classes=ex.n_experts).permute(2, 1, 0)
        hit = torch.greater(mask_EKT.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            slot, tok = torch.where(mask_EKT[e])
            x_nD = x_TD[tok]
            h_nH = F.silu(x_nD @ ex.w1[e]) * (x_nD @ ex.w3[e])
            final_TD.index_add_(0, tok, (h_nH @ ex.w2[e]) * topk_weight_TK[tok, slot, None])
        return final_TD, torch.bincount(topk_idx_TK.reshape(-1), minlength=ex.n_experts)


def _fwd_bwd(layer: torch.nn.Module, x_BTD: torch.Tensor, grad_BTD: torch.Tensor) -> Callable[[], None]:
    """One training step's worth of layer work, gradients kept allocated as the trainer keeps them."""
    accumulate_expert_grads_in_place(layer)

    def step() -> None:
        x = x_BTD.detach().requires_grad_(True)
        layer(x).backward(grad_BTD)
        layer.zero_grad(set_to_none=False)
        if isinstance(layer, MoE):
            layer.take_load()
            layer.take_dropped_fraction()
    return step


def _interleaved(candidates: dict[str, Callable[[], None]], rounds: dict[str, int]
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU seconds per call; each round times every candidate (that still has
    rounds to run) once, after one warm-up call each."""
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()
    for r in range(max(rounds.values())):
        for name, fn in candidates.items():
            if r < rounds[name]:
                c0 = time.process_time()
                wall[name].append(median_time(fn, repeats=1, warmup=0))
                cpu[name].append(time.process_time() - c0)
    return ({n: statistics.median(t) for n, t in wall.items()}, {n: statistics.median(t) for n, t in cpu.items()})


def _ep_worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out_file: str,
               ep: bool) -> None:
    """One process of the EP comparison; with ep=False the `world` processes run EP=1 side by side."""
    torch.set_num_threads(1)
    from moe.parallel.expert import apply_expert_parallel, make_stats_reducer

    cfg = _layer_config(args, args.experts)
    torch.manual_seed(0)
    layer = MoE(cfg)
    layer.init_weights(0.02, 0.02)
    if ep and world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        apply_expert_parallel(layer.experts, dist.group.WORLD, rank, world)
        layer.reduce_stats = make_stats_reducer(dist.group.WORLD)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(1, args.ep_tokens, args.d_model, generator=gen)
    g = torch.randn(1, args.ep_tokens, args.d_model, generator=gen)
    step = _fwd_bwd(layer, x, g)
    step()
    times = []
    for _ in range(args.rounds):
        if ep and world > 1:
            dist.barrier()
        times.append(median_time(step, repeats=1, warmup=0))
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    if ep and world > 1:
        dist.destroy_process_group()
    with open(f"{out_file}.{rank}", "w") as f:
        f.write(str(float(t)))


def _ep_step_time(args: argparse.Namespace, world: int, ep: bool = True) -> float:
    """Median step time of the slowest process (it sets the aggregate pace)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        mp.spawn(_ep_worker, args=(world, init_file, args, out_file, ep), nprocs=world, join=True)
        return max(float(Path(f"{out_file}.{r}").read_text()) for r in range(world))


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench moe")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--expert-hidden", type=int, default=704)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per forward+backward (one process)")
    p.add_argument("--ep-tokens", type=int, default=1024, help="tokens per worker in the EP comparison")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loop-rounds", type=int, default=2, help="rounds for the (slow) masked-loop baseline")
    p.add_argument("--sweep", default="8,16,32,64", help="n_experts values at fixed active parameters")
    return p.parse_args(argv)


def _candidates(args: argparse.Namespace, sweep: list[int], x: torch.Tensor, g: torch.Tensor
                ) -> tuple[dict[str, Callable[[], None]], dict[str, str], dict[str, str]]:
    """-> (one step per case, the table label of each, the expert kernel each MoE layer resolved)."""
    T, D = args.tokens, args.d_model
    candidates: dict[str, Callable[[], None]] = {}
    labels: dict[str, str] = {}
    torch.manual_seed(0)
    dense = SwiGLU(D, args.top_k * args.expert_hidden)
    dense.init_weights(0.02, 0.02)
    candidates["dense"] = _fwd_bwd(dense, x, g)
    labels["dense"] = f"dense SwiGLU hidden={args.top_k * args.expert_hidden}"
    kernels = {}
    for n_experts in sorted(set(sweep) | {args.experts}):
        layer = MoE(_layer_config(args, n_experts))
        layer.init_weights(0.02, 0.02)
        name = f"moe E={n_experts}"
        candidates[name] = _fwd_bwd(layer, x, g)
        labels[name] = f"MoE E={n_experts} top-{args.top_k} (sorted, grouped experts)"
        kernels[name] = layer.experts.resolve_kernel(x.view(T, D))
    loop = MaskedLoopMoE(_layer_config(args, args.experts))
    loop.init_weights(0.02, 0.02)
    candidates["masked loop"] = _fwd_bwd(loop, x, g)
    labels["masked loop"] = f"MoE E={args.experts} top-{args.top_k} (per-expert masked loop, HF Mixtral-style)"
    return candidates, labels, kernels


def _ep_rows(args: argparse.Namespace) -> tuple[list[dict], float, float]:
    """The EP comparison's rows; -> (rows, EP=1 and EP=2 aggregate tokens/s)."""
    t_ep1 = _ep_step_time(args, 1)
    t_ep2 = _ep_step_time(args, 2)
    t_solo2 = _ep_step_time(args, 2, ep=False)
    agg1, agg2, agg_solo2 = args.ep_tokens / t_ep1, 2 * args.ep_tokens / t_ep2, 2 * args.ep_tokens / t_solo2
    rows = [{"case": f"EP=1, 1 process, E={args.experts}, {args.ep_tokens} tokens/worker", "kernel": "",
             "step_ms": 1e3 * t_ep1, "tokens_per_s": agg1},
            {"case": f"EP=2, 2 gloo processes, E={args.experts}, {args.ep_tokens} tokens/worker", "kernel": "",
             "step_ms": 1e3 * t_ep2, "tokens_per_s": agg2},
            {"case": f"2 independent EP=1 processes side by side (this machine's ceiling for EP=2: "
                     f"{agg_solo2 / agg1:.2f}x)", "kernel": "", "step_ms": 1e3 * t_solo2, "tokens_per_s": agg_solo2}]
    return rows, agg1, agg2


def _notes(args: argparse.Namespace) -> list[str]:
    return [f"d_model={args.d_model} expert_hidden={args.expert_hidden} top_k={args.top_k} tokens={args.tokens} "
            f"(forward+backward, fp32, 1 thread per process, median of {args.rounds} interleaved rounds); "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
            "Every case keeps its gradients allocated between steps (zero_grad(set_to_none=False)) as the "
            "trainer does; the MoE layers add expert weight gradients into them in place.",
            "Goals use wall time (step_ms); cpu_ms is this process's CPU time for the same calls, "
            "less sensitive to other processes on a shared machine."]


def run(argv: list[str]) -> BenchResult:
    args = _parse_args(argv)
    torch.set_num_threads(1)
    T, D = args.tokens, args.d_model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, D, generator=gen)
    g = torch.randn(1, T, D, generator=gen)
    sweep = [int(e) for e in args.sweep.split(",")]
    candidates, labels, kernels = _candidates(args, sweep, x, g)
    rounds = {name: args.rounds for name in candidates}
    rounds["masked loop"] = args.loop_rounds  # ~10x slower than the rest
    secs, cpu = _interleaved(candidates, rounds)

    main = f"moe E={args.experts}"
    first = f"moe E={sweep[0]}"
    rows = []
    for name, t in secs.items():
        rows.append({"case": labels[name], "kernel": kernels.get(name, ""), "step_ms": 1e3 * t, "tokens_per_s": T / t,
                     "vs_dense": secs["dense"] / t, "vs_E8": t / secs[first] if name.startswith("moe") else None,
                     "cpu_ms": 1e3 * cpu[name], "cpu_vs_dense": cpu["dense"] / cpu[name]})
    ep_rows, agg1, agg2 = _ep_rows(args)
    rows.extend(ep_rows)
    goals = {
        f"MoE E={args.experts} top-{args.top_k} / dense tokens/s": Goal(secs["dense"] / secs[main], 0.85),
        "MoE / masked loop tokens/s": Goal(secs["masked loop"] / secs[main], 2.0),
        f"step time E={sweep[-1]} / E={sweep[0]}": Goal(secs[f"moe E={sweep[-1]}"] / secs[first], 1.2,
                                                        higher_is_better=False),
        "EP=2 / EP=1 aggregate tokens/s": Goal(agg2 / agg1, 1.8),
    }
    return BenchResult(name="moe", rows=rows, goals=goals, notes=_notes(args))
