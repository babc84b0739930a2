"""`python -m pipelines.bench pipeline`: pp=2 training throughput of each schedule against one process.

For each schedule (gpipe, 1f1b, interleaved_1f1b with 2 virtual stages per rank) and each microbatch
count m in {2, 4, 8}: forward + backward of the same global batch by two spawned gloo processes, one
pipeline of two ranks (moe.parallel: meta build, stage split, static shapes, the schedule), against
one process running the whole model on that batch (one thread per process, as on a 2-core box:
the pipeline uses twice the cores). All candidates run in the same processes, interleaved round by
round (each round times every candidate once, the median over rounds is kept), so load drifts hit
them alike. One process also runs the batch as m accumulated microbatches ("vs accum"), which
separates the pipeline's own efficiency from what microbatching alone changes. Next to the measured
speedup stands the bubble model's prediction
p * m / (m + p - 1) = 2m / (m + 1), and their ratio; the goal: the median schedule's ratio at m=8
reaches 0.85.

Activation memory per stage: the peak bytes of tensors autograd saved for backward (parameters
excluded) that were alive at once during a step, per rank, measured with saved-tensor hooks; gpipe
keeps every microbatch's activations until its backward, 1f1b at most p - stage microbatches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moe.config import ModelConfig, MoEConfig
from moe.experts import accumulate_expert_grads_in_place
from moe.model import build_meta_model, build_model, materialize
from moe.parallel.apply import parallelize
from moe.parallel.mesh import ParallelDims
from moe.parallel.pipeline import Pipeline, PipelineConfig
from pipelines.bench import BenchResult, Goal

SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2))
MIB = 1024 ** 2


def _parse_args(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench pipeline")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences); divisible by every m")
    p.add_argument("--microbatches", default="2,4,8")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(args)
    a.ms = [int(m) for m in a.microbatches.split(",")]
    return a


def _config(a: argparse.Namespace) -> ModelConfig:
    return ModelConfig(name="bench-pp", vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=4,
                       n_kv_heads=2, max_seq_len=a.seq, dense_hidden=3 * a.d_model, n_dense_layers=1,
                       moe=MoEConfig(n_routed_experts=a.experts, n_shared_experts=1, top_k=2,
                                     expert_hidden=a.expert_hidden, expert_kernel="loop"))


class _ActivationPeak:
    """Peak bytes of live saved-for-backward tensors (parameters excluded) while active."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.data_ptr() for p in model.parameters()}
        self.live = self.peak = 0

    def __enter__(self) -> _ActivationPeak:
        meter = self

        class Held:
            def __init__(self, t: torch.Tensor, n: int) -> None:
                self.t, self.n = t, n
                meter.live += n
                meter.peak = max(meter.peak, meter.live)

            def __del__(self) -> None:
                meter.live -= self.n

        def pack(t: torch.Tensor) -> Held:
            n = 0 if t.data_ptr() in self.params else t.numel() * t.element_size()
            return Held(t, n)

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _candidates(rank: int, a: argparse.Namespace) -> dict[str, tuple]:
    """name -> (step function, model it trains); every rank builds the same names in the same order."""
    cfg, world = _config(a), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out: dict[str, tuple] = {}
    whole = build_model(cfg, seed=0) if rank == 0 else None
    if whole is not None:
        accumulate_expert_grads_in_place(whole)

    def one_process(m: int = 1) -> None:  # the whole batch at once, or accumulated over m microbatches
        if whole is not None:
            for x, y in zip(inputs.chunk(m), targets.chunk(m), strict=True):
                F.cross_entropy(whole(x).flatten(0, 1), y.flatten(), reduction="sum").backward()
            whole.zero_grad(set_to_none=False)
    out["one process"] = (one_process, whole)
    for m in a.ms:
        out[f"one process m={m}"] = (lambda m=m: one_process(m), whole)
    for schedule, virtual in SCHEDULES:
        model = build_meta_model(cfg)
        plan = parallelize(model, ParallelDims.from_degrees(world, pp=2), device_type="cpu",
                           pipeline=PipelineConfig(schedule, 2, virtual))
        materialize(model, "cpu", seed=0)
        accumulate_expert_grads_in_place(model)
        for m in a.ms:
            pipe = Pipeline(model, plan.pipeline.specs, PipelineConfig(schedule, m, virtual), plan.mesh.pp_group)

            def step(pipe: Pipeline = pipe, model: torch.nn.Module = model) -> None:
                pipe.step(inputs, targets, loss_scale=1.0)
                model.zero_grad(set_to_none=False)
            out[f"{schedule} m={m}"] = (step, model)
    return out


def _measure(rank: int, a: argparse.Namespace) -> dict[str, dict[str, float]]:
    cands = _candidates(rank, a)
    act: dict[str, float] = {}
    for name, (fn, model) in cands.items():  # warm-up call, with the activation meter
        dist.barrier()
        if model is None:
            continue
        with _ActivationPeak(model) as meter:
            fn()
        act[name] = meter.peak / MIB
    times: dict[str, list[float]] = {name: [] for name in cands}
    cpu: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(a.rounds):
        for name, (fn, _) in cands.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            c1 = time.process_time()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(c1 - c0)
    return {name: {"s": statistics.median(t), "cpu_s": statistics.median(cpu[name]), "act_mib": act.get(name, 0.0)}
            for name, t in times.items()}


def _worker(rank: int, world: int, init_file: str, a: argparse.Namespace, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = _measure(rank, a)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, result)
        if rank == 0:
            Path(out_file).write_text(json.dumps(everyone))
    finally:
        dist.destroy_process_group()


def _spawn(a: argparse.Namespace) -> list[dict[str, dict[str, float]]]:
    with tempfile.TemporaryDirectory(prefix="bench-pp-") as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(2, init_file, a, out_file), nprocs=2, join=True)
        return json.loads(Path(out_file).read_text())


def _rows(a: argparse.Namespace, per_rank: list[dict]) -> tuple[list[dict], dict[str, Goal]]:
    r0, r1 = per_rank
    tokens = a.batch * a.seq
    base = r0["one process"]
    rows, ratios_m8 = [], []
    for schedule, _ in SCHEDULES:
        for m in a.ms:
            name = f"{schedule} m={m}"
            speedup = base["s"] / r0[name]["s"]
            ideal = 2 * m / (m + 1)
            accum = r0[f"one process m={m}"]["s"]
            rows.append({"schedule": schedule, "m": m, "pp2 tok/s": round(tokens / r0[name]["s"]),
                         "1 proc tok/s": round(tokens / base["s"]), "speedup": round(speedup, 3),
                         "1 proc accum tok/s": round(tokens / accum), "vs accum": round(accum / r0[name]["s"], 3),
                         "bubble model": round(ideal, 3), "ratio": round(speedup / ideal, 3),
                         "busy r0/r1": f"{r0[name]['cpu_s'] / r0[name]['s']:.2f}/{r1[name]['cpu_s'] / r0[name]['s']:.2f}",
                         "act MiB stage0": round(r0[name]["act_mib"], 1), "act MiB stage1": round(r1[name]["act_mib"], 1),
                         "act MiB 1 proc": round(base["act_mib"], 1)})
            if m == max(a.ms):
                ratios_m8.append(speedup / ideal)
    goal = Goal(value=round(statistics.median(ratios_m8), 3), target=0.85)
    return rows, {f"median schedule speedup / bubble model at m={max(a.ms)}": goal}


def run(args: list[str]) -> BenchResult:
    a = _parse_args(args)
    per_rank = _spawn(a)
    rows, goals = _rows(a, per_rank)
    base = per_rank[0]["one process"]
    notes = [f"model d_model={a.d_model}, {a.layers} layers (1 dense), {a.experts} experts of {a.expert_hidden} top-2 "
             f"+1 shared, vocab {a.vocab}; global batch {a.batch} x {a.seq} tokens; fp32, 1 thread per process; "
             f"median of {a.rounds} interleaved rounds",
             "speedup = one process's step time / pp=2 step time (forward + backward, same global batch); "
             "bubble model = 2m/(m+1); ratio = speedup / bubble model (the goal); 'vs accum' = against one "
             "process accumulating over the same m microbatches; busy r0/r1 = each rank's process CPU time / the "
             "step's wall time (1.00: never waiting; the gap is bubble, communication and other processes' load); "
             f"one process busy {base['cpu_s'] / base['s']:.2f}; act MiB = peak live saved activations per rank"]
    return BenchResult(name="pipeline", rows=rows, goals=goals, notes=notes)
