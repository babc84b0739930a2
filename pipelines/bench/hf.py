"""`python -m pipelines.bench hf`: our model against the stock transformers class on the same
exported weights, one process, fp32, side by side (interleaved rounds, medians):

  - training: forward + backward + AdamW step on the same batch (tokens/s); goal: ours >= 2x;
  - generation: greedy decoding of 32 prompts at once, ours (moe.generate, KV cache) against
    transformers `generate` (tokens/s of generated tokens); goal: ours >= 2x;
  - the logits of both on the benchmark batch (max |difference|, checked in the run) and whether
    both generate the same greedy tokens;
  - generation of ours also with `moe.expert_kernel=grouped_mm` (one grouped GEMM per layer instead
    of the per-expert kernel `auto` picks on CPU), a row beside the goal, which uses the default.

The weights: our preset (default `small`, conf/model/) initialized with a seed and nonzero expert
biases, exported with `moe.hf.export_hf` to a temporary directory; the transformers side is
`AutoModelForCausalLM.from_pretrained(dir)` (its default attention and experts implementation),
ours is `moe.hf.load_hf(dir)`. Both compute the same loss from their logits (cross entropy, ours
adds its aux/z losses as in training) and step with `torch.optim.AdamW`; ours keeps expert
gradients allocated as the trainer does.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moe.config import ModelConfig, MoEConfig
from moe.experts import GroupedExperts, accumulate_expert_grads_in_place
from moe.generate import SamplingParams, generate
from moe.hf import export_hf, load_hf
from moe.model import build_model
from pipelines.bench import BenchResult, Goal
from pipelines.core.config import CONF_DIR

CPU_SECONDS: dict[str, float] = {}  # the last `_interleaved` call's median process CPU seconds per candidate


def _parse_args(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench hf")
    p.add_argument("--preset", default="small", help="model preset in conf/model/ (default small)")
    p.add_argument("--score-func", choices=["softmax", "sigmoid"], default=None,
                   help="override the preset's router (softmax -> Ernie4_5_Moe, sigmoid -> Glm4Moe)")
    p.add_argument("--batch", type=int, default=8, help="training sequences per step")
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--prompts", type=int, default=32, help="prompts decoded at once")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side (median kept)")
    p.add_argument("--gen-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(args)


def _config(args: argparse.Namespace) -> ModelConfig:
    d = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{args.preset}.yaml"))
    cfg = ModelConfig(**{**d, "moe": MoEConfig(**d.pop("moe"))})
    if args.score_func:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, score_func=args.score_func))
    return cfg.validate(seq_len=max(args.seq, args.prompt_len + args.new_tokens))


def _models(cfg: ModelConfig, seed: int, directory: str) -> tuple[Any, Any]:
    """(ours, theirs) loaded from one exported directory."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = build_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.moe_layers().values():
            layer.router.expert_bias.copy_(0.01 * torch.randn(cfg.moe.n_routed_experts, generator=gen))
    export_hf(model, directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return load_hf(directory), theirs


def _train_step(model: Any, tokens_BT1: torch.Tensor, ours: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()
    if ours:
        accumulate_expert_grads_in_place(model)

    def step() -> None:
        out = model(tokens_BT1[:, :-1])
        logits = out if ours else out.logits
        F.cross_entropy(logits.flatten(0, 1), tokens_BT1[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=not ours)
        if ours:
            for layer in model.moe_layers().values():
                layer.take_load()
                layer.take_dropped_fraction()
    return step


def _interleaved(candidates: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median wall seconds per call; every round times each candidate once, after one warm-up call
    each. The median process CPU seconds go to `CPU_SECONDS` (other processes' load inflates wall
    time, not this process's CPU time)."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    CPU_SECONDS.update({k: statistics.median(v) for k, v in cpu.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def _set_expert_kernel(model: Any, kernel: str) -> None:
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.kernel = kernel


def _logits_diff(ours: Any, theirs: Any, tokens_BT: torch.Tensor) -> float:
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        return float((ours(tokens_BT) - theirs(tokens_BT).logits).abs().max())


def _generation(ours: Any, theirs: Any, prompts_BP: torch.Tensor, new_tokens: int, rounds: int
                ) -> tuple[dict[str, float], float]:
    """(median seconds per side, fraction of prompts whose greedy tokens agree)."""
    ours.eval()
    theirs.eval()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    result: dict[str, Any] = {}
    cfg_kernel = ours.cfg.moe.expert_kernel

    def run_ours() -> None:
        result["ours"] = [s.output_ids for s in generate(ours, prompts_BP.tolist(), params)]

    def run_ours_grouped() -> None:  # the same model with moe.expert_kernel=grouped_mm (one call per layer)
        _set_expert_kernel(ours, "grouped_mm")
        try:
            result["ours_grouped"] = [s.output_ids for s in generate(ours, prompts_BP.tolist(), params)]
        finally:
            _set_expert_kernel(ours, cfg_kernel)

    @torch.no_grad()
    def run_theirs() -> None:
        out = theirs.generate(prompts_BP, attention_mask=torch.ones_like(prompts_BP), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                              pad_token_id=0)
        result["theirs"] = out[:, prompts_BP.shape[1]:].tolist()

    times = _interleaved({"ours": run_ours, "transformers": run_theirs,
                          "ours, expert_kernel=grouped_mm": run_ours_grouped}, rounds)
    agree = sum(a == b == c for a, b, c in zip(result["ours"], result["theirs"], result["ours_grouped"])) \
        / len(prompts_BP)
    return times, agree


def run(args: list[str]) -> BenchResult:
    a = _parse_args(args)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cfg = _config(a)
    gen = torch.Generator().manual_seed(a.seed + 1)
    batch_BT1 = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=gen)
    prompts_BP = torch.randint(0, cfg.vocab_size, (a.prompts, a.prompt_len), generator=gen)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as directory:
        ours, theirs = _models(cfg, a.seed, directory)
    arch = type(theirs).__name__
    diff = _logits_diff(ours, theirs, batch_BT1[:, :-1])
    gen_s, agree = _generation(ours, theirs, prompts_BP, a.new_tokens, a.gen_rounds)
    gen_cpu = dict(CPU_SECONDS)
    train_s = _interleaved({"ours": _train_step(ours, batch_BT1, True),
                            "transformers": _train_step(theirs, batch_BT1, False)}, a.rounds)
    train_cpu = dict(CPU_SECONDS)
    n_train, n_gen = a.batch * a.seq, a.prompts * a.new_tokens
    rows = [
        {"what": f"train step ({a.batch}x{a.seq} tokens)", "side": side, "s_per_call": t,
         "cpu_s_per_call": train_cpu[side], "tokens_per_s": n_train / t} for side, t in train_s.items()
    ] + [
        {"what": f"generate ({a.prompts} prompts x {a.new_tokens} tokens)", "side": side, "s_per_call": t,
         "cpu_s_per_call": gen_cpu[side], "tokens_per_s": n_gen / t} for side, t in gen_s.items()
    ]
    goals = {
        "train_tokens_per_s_vs_transformers": Goal(train_s["transformers"] / train_s["ours"], 2.0),
        "generate_tokens_per_s_vs_transformers": Goal(gen_s["transformers"] / gen_s["ours"], 2.0),
        "logits_max_abs_diff": Goal(diff, 1e-4, higher_is_better=False),
    }
    notes = [f"model: preset {cfg.name} ({cfg.moe.score_func} router -> {arch}), fp32, "
             f"{torch.get_num_threads()} threads; transformers attention={theirs.config._attn_implementation}, "
             f"experts={getattr(theirs.config, '_experts_implementation', None)}",
             f"logits on the training batch: max |ours - transformers| = {diff:.2e}",
             f"greedy generation: {agree:.0%} of the {a.prompts} prompts produce the same tokens on both sides",
             f"by process CPU time (robust to other load): train {train_cpu['transformers'] / train_cpu['ours']:.2f}x, "
             f"generate {gen_cpu['transformers'] / gen_cpu['ours']:.2f}x"]
    return BenchResult("hf", rows, goals, notes)
