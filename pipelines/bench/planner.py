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
independently of the training steps: once, the gloo all-reduce bandwidth (32 MiB, as `intra_node_gbps`)
and latency (one float, as `collective_base_us`) between two processes; per row, sampled by every rank
at once after each timed step of the time run (pipelines/bench/host_rates.py: a shared machine's speed
drifts from second to second, so rates taken a minute apart judged nothing), the FLOP/s its matrix
products sustain at their shapes, the seconds per token of its other operations and the bandwidth an
AdamW step reaches (`HostRates`, `memory_gbps`: the slowest rank's medians). The one-GEMM matmul peak
is reported, not used. Also reported: TP=2 throughput against one process on the same batch (tp=2
uses two cores). Goals: memory within 15% and step time within 30% of the
measurement (the largest deviation over the rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.config import ClusterConfig
from moe.config import ModelConfig, MoEConfig
from moe.flops import measure_matmul_peak
from moe.parallel.mesh import ParallelDims
from pipelines.bench import BenchResult, Goal
from pipelines.bench.host_rates import HostProbe, MeasuredHost, build_training_model, lm_loss
from pipelines.train.planner import HostRates, Layout, Workload, estimate

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
    p.add_argument("--steps", type=int, default=5, help="timed steps after the untimed ones")
    return p.parse_args(args)


def model_config(d: int, layers: int) -> ModelConfig:
    moe = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=d, expert_kernel="loop")
    return ModelConfig(name=f"bench-d{d}", vocab_size=8 * d, d_model=d, n_layers=layers, n_heads=8, n_kv_heads=4,
                       max_seq_len=512, dense_hidden=4 * d, n_dense_layers=1, moe=moe)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _steps(model: torch.nn.Module, plan: object, opt: torch.optim.Optimizer, tokens: torch.Tensor, n: int,
           world: int, probe: HostProbe | None = None) -> list[tuple[float, float]]:
    """n + 1 training steps, the first untimed (with a probe: n + 2, the second untimed too and recorded on
    the probe's tape, and the probe sampled by every rank at once after each timed step); the timed steps'
    (wall, CPU) seconds."""
    times = []
    untimed = 2 if probe else 1
    for step in range(n + untimed):
        _barrier(world)
        t0, c0 = time.perf_counter(), time.process_time()
        if probe and step == 1:
            with probe.tape:
                lm_loss(model, tokens).backward()
        else:
            lm_loss(model, tokens).backward()
        plan.sync_gradients()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if step >= untimed:
            times.append((time.perf_counter() - t0, time.process_time() - c0))
            if probe:
                _barrier(world)
                probe.sample()
                opt.zero_grad(set_to_none=False)  # the replay accumulated into the gradients again
    return times


def _rank(rank: int, world: int, init_file: str, spec: dict, out: mp.Queue) -> None:
    """One rank. Memory run (spec["memory"]): a warm-up run of the same layout on a 1/8-width model (the
    runtime touches its own pages and buffers there), then the measured run; the peak counts from the RSS
    between the two. Time run: the measured model's steps, with a `HostProbe` sampled after each."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg: ModelConfig = spec["cfg"]
    dims = ParallelDims.from_degrees(world, spec["dp"], spec["ep"], 1, cfg.moe.n_routed_experts, tp=spec["tp"])
    gen = torch.Generator().manual_seed(dims.data_rank(rank))
    tokens = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"] + 1), generator=gen)
    probe = None
    if spec["memory"]:
        small = dataclasses.replace(cfg, d_model=cfg.d_model // 8, dense_hidden=cfg.dense_hidden // 8,
                                    moe=dataclasses.replace(cfg.moe, expert_hidden=cfg.moe.expert_hidden // 8))
        _steps(*build_training_model(small, dims, spec["recompute"]), tokens, 1, world)
    else:
        probe = HostProbe(cfg, spec["batch"], spec["seq"], spec["tp"], spec["ep"])
    base = _rss()
    times = _steps(*build_training_model(cfg, dims, spec["recompute"]), tokens, spec["steps"], world, probe)
    out.put((rank, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, times,
             probe.medians() if probe else None))
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


def _spawn(target, spec: object, world: int, env: dict[str, str | None] | None = None) -> list[tuple]:
    """Run `target(rank, world, init_file, spec, queue)` in `world` spawned processes with `env` set (None:
    unset) for them; what each put on the queue (one item per rank)."""
    env = env or {}
    saved = {k: os.environ.get(k) for k in env}
    _set_env(env)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init_file = _gloo_init_file()
    try:
        procs = [ctx.Process(target=target, args=(r, world, init_file, spec, out)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        _set_env(saved)
    results, deadline = [], time.monotonic() + 1800
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a benchmark rank failed (exit codes {failed}; its traceback is above)"
                                   if failed else "benchmark ranks gave no result in 30 minutes") from None
    for p in procs:
        p.join()
    return results


def _measure(spec: dict, world: int) -> tuple[int, float, float, MeasuredHost]:
    """(largest rank's peak bytes, median over steps of the slowest rank's step time, the same of its CPU
    seconds: without waits, what load on the machine changes least, the host's rates sampled between the
    steps), from two runs: the memory run with large allocations forced to mmap, the time run with the
    allocator as training has it (forced mmap zero-fills fresh pages on every step: about 0.3 s of page
    faults per step at d=512)."""
    mem = _spawn(_rank, {**spec, "memory": True, "steps": 1}, world, {"MALLOC_MMAP_THRESHOLD_": "65536"})
    timed = _spawn(_rank, {**spec, "memory": False}, world, {"MALLOC_MMAP_THRESHOLD_": None})
    steps = list(zip(*(r[2] for r in timed), strict=True))
    return (max(r[1] for r in mem), statistics.median(max(w for w, _ in s) for s in steps),
            statistics.median(max(c for _, c in s) for s in steps), MeasuredHost.slowest([r[3] for r in timed]))


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
    out.put((rank, statistics.median(times)))
    dist.destroy_process_group()


def _allreduce_seconds(nbytes: int) -> float:
    """Median seconds of a 2-process gloo all-reduce of `nbytes` on this machine (rank 0's)."""
    return dict(_spawn(_allreduce_rank, nbytes, 2))[0]


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
    bw, lat = measure_gloo_bandwidth(), measure_gloo_latency()
    cluster = dataclasses.replace(ClusterConfig(), intra_node_gbps=bw / 1e9, collective_base_us=lat * 1e6)
    rows, mem_dev, time_dev, tok_s = [], [], [], {}
    for d in (int(x) for x in a.sizes.split(",")):
        cfg = model_config(d, a.layers)
        for label, dp, tp, ep, recompute in LAYOUTS:
            world = dp * tp * ep
            spec = {"cfg": cfg, "dp": dp, "tp": tp, "ep": ep, "recompute": recompute, "batch": a.batch,
                    "seq": a.seq, "steps": a.steps}
            mem, step_s, cpu_s, host = _measure(spec, world)
            est = estimate(Workload(cfg, a.seq, a.batch, recompute), Layout(dp=dp, tp=tp, ep=ep),
                           dataclasses.replace(cluster, memory_gbps=host.adamw_bytes_per_s / 1e9), peak,
                           HostRates(host.matmul_flops, host.other_s_per_token))
            t = est.time
            tokens_s = a.batch * a.seq * dp * ep / step_s
            one = tok_s.setdefault(d, tokens_s)  # the first layout is one process
            rows.append({"model": f"d={d}", "layout": label, "ranks": world,
                         "measured MiB": round(mem / MIB, 1), "planned MiB": round(est.memory.peak / MIB, 1),
                         "mem ratio": round(est.memory.peak / mem, 3),
                         "measured s": round(step_s, 4), "planned s": round(t.total_s, 4),
                         "time ratio": round(t.total_s / step_s, 3), "measured CPU s": round(cpu_s, 4),
                         "GFLOP/s": round(host.matmul_flops / 1e9, 1), "compute s": round(t.compute_s, 4),
                         "other ops s": round(t.other_ops_s, 4), "AdamW s": round(t.optimizer_s, 4),
                         "comm s": round(t.tp_s + t.all_to_all_s + t.dp_s, 4),
                         "tokens/s": round(tokens_s), "vs 1 process": round(tokens_s / one, 3)})
            mem_dev.append(abs(est.memory.peak / mem - 1))
            time_dev.append(abs(t.total_s / step_s - 1))
    goals = {"memory within 15% (max |planned/measured - 1|)": Goal(max(mem_dev), 0.15, higher_is_better=False),
             "step time within 30% (max |planned/measured - 1|)": Goal(max(time_dev), 0.30, higher_is_better=False)}
    notes = [f"CPU matmul peak {peak / 1e9:.1f} GFLOP/s (1 thread, one 1024^3 GEMM; not used by the planner here), "
             f"gloo all-reduce {bw / 1e9:.2f} GB/s, latency {lat * 1e6:.0f} us (2 processes, idle)",
             "sampled by every rank at once between the time run's steps (pipelines/bench/host_rates.py), the "
             "slowest rank's medians: 'GFLOP/s' its matrix products sustain at their shapes, 'other ops s' its "
             "other operations replayed, the AdamW bandwidth ('AdamW s')",
             "tokens/s: measured; 'vs 1 process': against the same model's one-process row (tp=2: the same batch "
             "on two processes)", f"load average at the end: {os.getloadavg()[0]:.2f}"]
    return BenchResult("planner", rows, goals, notes)
