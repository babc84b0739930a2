"""`python -m pipelines.bench planner`: the planner's memory and step-time predictions against real runs.

For several layouts and two model sizes, real training steps (meta build -> parallelize -> materialize,
forward, backward, gradient sync, AdamW step, gradients kept allocated as the trainer keeps them)
run in spawned gloo processes on this CPU, one thread each, twice per configuration:
- memory run: the largest rank's peak resident set growth (`ru_maxrss` minus the RSS just before the
  model is built), after a warm-up run of the same layout on a model of 1/8 the width has touched the
  runtime's own pages and buffers; large allocations are forced to mmap (`MALLOC_MMAP_THRESHOLD_`), so
  freed memory returns to the OS and the RSS peak tracks the live peak;
- time run, with the allocator as training has it (forced mmap zero-fills fresh pages on every step:
  about 289,000 page faults and 0.4-0.9 s of CPU on a 1.3 s step at d=512): the median over timed steps of the
  slowest rank's wall time; next to it the same of its CPU time (without waits: what load on this
  shared machine changes least).
Next to them stand the planner's predictions (pipelines/train/planner.py) for the same configuration on
the local CPU profile, with what the planner cannot know about a CPU measured in the same run, each
independently of the training runs: the compute rate at each row's own GEMM and attention shapes
(`moe.flops.measure_training_rate`, in place of peak x expected_mfu), the gloo all-reduce bandwidth
(32 MiB, as `intra_node_gbps`) and latency (one float, as `collective_base_us`) between two processes,
and the bandwidth an AdamW step reaches (`moe.flops.measure_adamw_bandwidth`, as `memory_gbps`). The
one-GEMM matmul peak is reported, not used. Also reported: TP=2 throughput against one process on the
same batch (tp=2 uses two cores). Goals: memory within 15% and step time within 30% of the
measurement (the largest deviation over the rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cluster.config import ClusterConfig
from moe.config import ModelConfig, MoEConfig
from moe.experts import accumulate_expert_grads_in_place
from moe.flops import measure_adamw_bandwidth, measure_matmul_peak, measure_training_rate
from moe.model import build_meta_model, materialize
from moe.parallel.apply import parallelize
from moe.parallel.mesh import ParallelDims
from pipelines.bench import BenchResult, Goal
from pipelines.train.planner import Layout, Workload, estimate

MIB = 1024 ** 2
LAYOUTS = (  # (label, dp, tp, ep, activation checkpointing)
    ("1 process", 1, 1, 1, "none"),
    ("1 process, recompute full", 1, 1, 1, "full"),
    ("tp=2", 1, 2, 1, "none"),
    ("ep=2", 1, 1, 2, "none"),
    ("dp=2", 2, 1, 1, "none"),
)


def _parse_args(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench planner")
    p.add_argument("--sizes", default="256,512", help="d_model of each model size (expert width = d_model)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="sequences per data-parallel rank")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    return p.parse_args(args)


def model_config(d: int, layers: int) -> ModelConfig:
    moe = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=d, expert_kernel="loop")
    return ModelConfig(name=f"bench-d{d}", vocab_size=8 * d, d_model=d, n_layers=layers, n_heads=8, n_kv_heads=4,
                       max_seq_len=512, dense_hidden=4 * d, n_dense_layers=1, moe=moe)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(cfg: ModelConfig, dims: ParallelDims, recompute: str) -> tuple[torch.nn.Module, object, object]:
    model = build_meta_model(cfg)
    plan = parallelize(model, dims, device_type="cpu", activation_checkpointing=recompute)
    materialize(model, "cpu", seed=0)
    accumulate_expert_grads_in_place(model)
    return model, plan, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _steps(model: torch.nn.Module, plan: object, opt: torch.optim.Optimizer, tokens: torch.Tensor, n: int,
           world: int) -> list[tuple[float, float]]:
    """n + 1 training steps (the first untimed); the timed steps' (wall, CPU) seconds."""
    times = []
    for step in range(n + 1):
        if world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        plan.sync_gradients()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if step:
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def _rank(rank: int, world: int, init_file: str, spec: dict, out: mp.Queue) -> None:
    """One rank. Memory run (spec["memory"]): a warm-up run of the same layout on a 1/8-width model (the
    runtime touches its own pages and buffers there), then the measured run; the peak counts from the RSS
    between the two. Time run: the measured model's steps alone."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg: ModelConfig = spec["cfg"]
    dims = ParallelDims.from_degrees(world, spec["dp"], spec["ep"], 1, cfg.moe.n_routed_experts, tp=spec["tp"])
    gen = torch.Generator().manual_seed(dims.data_rank(rank))
    tokens = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"] + 1), generator=gen)
    if spec["memory"]:
        small = dataclasses.replace(cfg, d_model=cfg.d_model // 8, dense_hidden=cfg.dense_hidden // 8,
                                    moe=dataclasses.replace(cfg.moe, expert_hidden=cfg.moe.expert_hidden // 8))
        _steps(*_build(small, dims, spec["recompute"]), tokens, 1, world)
    base = _rss()
    times = _steps(*_build(cfg, dims, spec["recompute"]), tokens, spec["steps"], world)
    out.put((rank, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, times))
    if world > 1:
        dist.destroy_process_group()


def _gloo_init_file() -> str:
    """A fresh path for gloo's file rendezvous (the file must not exist yet)."""
    fd, init_file = tempfile.mkstemp(prefix="gloo-init-")
    os.close(fd)
    os.unlink(init_file)
    return init_file


def _set_env(env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _spawn(spec: dict, world: int, env: dict[str, str | None]) -> list[tuple[int, int, list[float]]]:
    """Run `_rank` in `world` spawned processes with `env` set (None: unset) for them; their results."""
    saved = {k: os.environ.get(k) for k in env}
    _set_env(env)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init_file = _gloo_init_file()
    try:
        procs = [ctx.Process(target=_rank, args=(r, world, init_file, spec, out)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        _set_env(saved)
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a benchmark rank failed with exit code {p.exitcode}")
    return results


def _measure(spec: dict, world: int) -> tuple[int, float, float]:
    """(largest rank's peak bytes, median over steps of the slowest rank's step time, the same of its CPU
    seconds: without waits, what load on the machine changes least), from two runs: the
    memory run with large allocations forced to mmap, the time run with the allocator as training has it
    (forced mmap zero-fills fresh pages on every step: about 0.3 s of page faults per step at d=512)."""
    mem = _spawn({**spec, "memory": True, "steps": 1}, world, {"MALLOC_MMAP_THRESHOLD_": "65536"})
    timed = _spawn({**spec, "memory": False}, world, {"MALLOC_MMAP_THRESHOLD_": None})
    steps = list(zip(*(r[2] for r in timed), strict=True))
    return (max(r[1] for r in mem), statistics.median(max(w for w, _ in s) for s in steps),
            statistics.median(max(c for _, c in s) for s in steps))


def _allreduce_rank(rank: int, world: int, init_file: str, nbytes: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    t = torch.ones(max(nbytes // 4, 1))
    dist.all_reduce(t)
    times = []
    for _ in range(5 if nbytes > MIB else 50):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def _allreduce_seconds(nbytes: int) -> float:
    """Median seconds of a 2-process gloo all-reduce of `nbytes` on this machine."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init_file = _gloo_init_file()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, 2, init_file, nbytes, out)) for r in range(2)]
    for p in procs:
        p.start()
    seconds = out.get(timeout=600)
    for p in procs:
        p.join()
    return seconds


def measure_gloo_bandwidth(nbytes: int = 32 * MIB) -> float:
    """Bytes/s of a 2-process gloo all-reduce on this machine (what `intra_node_gbps` means here; a ring
    all-reduce moves 2 (n-1)/n of the bytes: 1x for n = 2)."""
    return nbytes / _allreduce_seconds(nbytes)


def measure_gloo_latency() -> float:
    """Seconds of a 2-process gloo all-reduce of one float: the per-collective latency (`collective_base_us`
    here; the hop terms stay 0, two processes cannot separate them)."""
    return _allreduce_seconds(4)


def run(args: list[str]) -> BenchResult:
    a = _parse_args(args)
    torch.set_num_threads(1)
    peak = measure_matmul_peak()
    bw, lat, adamw = measure_gloo_bandwidth(), measure_gloo_latency(), measure_adamw_bandwidth()
    cluster = dataclasses.replace(ClusterConfig(), intra_node_gbps=bw / 1e9, collective_base_us=lat * 1e6,
                                  memory_gbps=adamw / 1e9)
    rows, mem_dev, time_dev, tok_s, rates = [], [], [], {}, {}
    for d in (int(x) for x in a.sizes.split(",")):
        cfg = model_config(d, a.layers)
        for label, dp, tp, ep, recompute in LAYOUTS:
            world = dp * tp * ep
            spec = {"cfg": cfg, "dp": dp, "tp": tp, "ep": ep, "recompute": recompute, "batch": a.batch,
                    "seq": a.seq, "steps": a.steps}
            mem, step_s, cpu_s = _measure(spec, world)
            if (d, tp, ep) not in rates:  # this rank's GEMMs and attention at their shapes, here on one thread
                rates[d, tp, ep] = measure_training_rate(cfg, a.batch, a.seq, tp, ep)
            est = estimate(Workload(cfg, a.seq, a.batch, recompute), Layout(dp=dp, tp=tp, ep=ep), cluster, peak,
                           rates[d, tp, ep])
            t = est.time
            tokens_s = a.batch * a.seq * dp * ep / step_s
            one = tok_s.setdefault(d, tokens_s)  # the first layout is one process
            rows.append({"model": f"d={d}", "layout": label, "ranks": world,
                         "measured MiB": round(mem / MIB, 1), "planned MiB": round(est.memory.peak / MIB, 1),
                         "mem ratio": round(est.memory.peak / mem, 3),
                         "measured s": round(step_s, 4), "planned s": round(t.total_s, 4),
                         "time ratio": round(t.total_s / step_s, 3), "measured CPU s": round(cpu_s, 4),
                         "GFLOP/s": round(rates[d, tp, ep] / 1e9, 1), "compute s": round(t.compute_s, 4),
                         "AdamW s": round(t.optimizer_s, 4), "comm s": round(t.tp_s + t.all_to_all_s + t.dp_s, 4),
                         "tokens/s": round(tokens_s), "vs 1 process": round(tokens_s / one, 3)})
            mem_dev.append(abs(est.memory.peak / mem - 1))
            time_dev.append(abs(t.total_s / step_s - 1))
    goals = {"memory within 15% (max |planned/measured - 1|)": Goal(max(mem_dev), 0.15, higher_is_better=False),
             "step time within 30% (max |planned/measured - 1|)": Goal(max(time_dev), 0.30, higher_is_better=False)}
    notes = [f"CPU matmul peak {peak / 1e9:.1f} GFLOP/s (1 thread, one 1024^3 GEMM; not used by the planner here), "
             f"gloo all-reduce {bw / 1e9:.2f} GB/s, latency {lat * 1e6:.0f} us (2 processes), AdamW "
             f"{adamw / 1e9:.1f} GB/s; the planner's compute rate: 'GFLOP/s', measured at each row's GEMM and "
             "attention shapes (moe.flops.measure_training_rate)",
             "tokens/s: measured; 'vs 1 process': against the same model's one-process row (tp=2: the same batch "
             "on two processes)", f"load average at the end: {os.getloadavg()[0]:.2f}"]
    return BenchResult("planner", rows, goals, notes)
