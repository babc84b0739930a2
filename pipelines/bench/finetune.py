"""`python -m pipelines.bench finetune`: a LoRA step against a full fine-tuning step of the same model,
and a DP-SGD LoRA step against the non-private one, one process, fp32, interleaved rounds, medians.

  - full: every parameter trains (AdamW, expert gradients kept allocated as the trainer does);
  - frozen: the same model with every weight frozen and no adapters, backward through every layer
          (input gradients only): the floor a LoRA step approaches as rank / d_model shrinks;
  - lora: rank-8 adapters on every target (moe/lora.py), AdamW over the adapters only;
  - dp:   the same adapters, DP-SGD as pipelines/finetune runs it: exact per-example gradients,
          clipping, Gaussian noise (pipelines/finetune/privacy.py), AdamW.
Each step is forward + backward + optimizer step on the same batch; each row gives the medians of
the whole step and of its three phases (dp: clipping and noise count as optimizer time), and the
process's CPU time per step (with one thread, the work itself: what a loaded machine leaves intact).
Optimizer-state bytes are the AdamW moments after a step. Goals (issue #18): LoRA step time <= 0.8x
the full step's; LoRA optimizer state < 2% of the full one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moe.config import ModelConfig, MoEConfig
from moe.experts import accumulate_expert_grads_in_place
from moe.lora import LoRAConfig, apply_lora, capture_per_example, lora_param_counts
from moe.model import build_meta_model, build_model
from pipelines.bench import BenchResult, Goal
from pipelines.core.config import CONF_DIR
from pipelines.finetune.privacy import clip_into, noisy_mean, secret_generator


def _preset(name: str) -> ModelConfig:
    d = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
    moe = MoEConfig(**{**d.pop("moe"), "aux_loss_coef": 0.0, "z_loss_coef": 0.0, "bias_update_rate": 0.0})
    return ModelConfig(**d, moe=moe)


def _step_fn(kind: str, cfg: ModelConfig, batch: torch.Tensor, rank: int
             ) -> tuple[Callable[[], tuple[float, float, float]], torch.optim.Optimizer | None]:
    """The step of `kind` (returning its forward, backward and optimizer seconds) and its optimizer."""
    model = build_model(cfg, seed=0)
    if kind == "full":
        accumulate_expert_grads_in_place(model)
    elif kind == "frozen":  # LoRA's floor: no adapters, input gradients down to the embedding output
        for p in model.parameters():
            p.requires_grad_(False)
        model.tok_emb.register_forward_hook(lambda _mod, _inp, out: out.requires_grad_(True))
    else:
        apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    inputs, targets = batch[:, :-1], batch[:, 1:]
    gen = secret_generator()

    def plain() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=kind != "full")
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    def private() -> tuple[float, float, float]:  # optimizer: clipping and noise, then AdamW
        t0 = time.perf_counter()
        sums = [torch.zeros_like(p) for p in params]
        with capture_per_example(len(inputs), inputs.shape[1]):
            ce = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="none")
            t1 = time.perf_counter()
            ce.view(len(inputs), -1).mean(1).sum().backward()
        t2 = time.perf_counter()
        clip_into(params, sums, 1.0)
        noisy_mean(params, sums, 1.0, len(inputs), 0, gen)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return (private if kind == "dp" else plain), opt


def _optimizer_bytes(opt: torch.optim.Optimizer | None) -> int:
    return 0 if opt is None else sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.ndim > 0)


# Presets whose full fine-tuning step does not fit this CPU run with their layer shapes (width, heads, dense
# and expert widths, top-k, shared experts) at a reduced depth, expert count and vocabulary. The cut
# changes the mix (the one dense layer and the frozen embeddings weigh more), so each row's note also
# gives the whole preset's optimizer-state ratio counted from shapes on the meta device.
CPU_CUTS = {"deepseek_moe_16b": {"n_layers": 2, "n_routed_experts": 16, "vocab_size": 32768},
            "moe_67b": {"n_layers": 2, "n_routed_experts": 8, "vocab_size": 32768}}


def bench_model(preset: str) -> tuple[ModelConfig, str]:
    """The preset (cut to fit this CPU where `CPU_CUTS` says so) and its label."""
    cfg = _preset(preset)
    cut = CPU_CUTS.get(preset)
    if not cut:
        return cfg, preset
    label = (f"{preset} layers ({cut['n_layers']} of {cfg.n_layers}, {cut['n_routed_experts']} experts, "
             f"vocab {cut['vocab_size']})")
    moe = dataclasses.replace(cfg.moe, n_routed_experts=cut["n_routed_experts"])
    return dataclasses.replace(cfg, n_layers=cut["n_layers"], vocab_size=cut["vocab_size"], moe=moe), label


def _measure(cfg: ModelConfig, label: str, batch_size: int, seq: int, rank: int, rounds: int
             ) -> tuple[list[dict], dict[str, float], dict[str, int]]:
    """Rows of one model (full, frozen, lora, dp steps), the median step times and the optimizer bytes."""
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq + 1), generator=torch.Generator().manual_seed(0))
    steps = {k: _step_fn(k, cfg, batch, rank) for k in ("full", "frozen", "lora", "dp")}
    for fn, _ in steps.values():  # warm up (allocates optimizer state and gradients)
        fn()
    phases: dict[str, list[tuple[float, float, float]]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):  # interleaved: machine noise hits every candidate alike
        for k, (fn, _) in steps.items():
            c0 = time.process_time()
            phases[k].append(fn())
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(sum(p) for p in v) for k, v in phases.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    part = {k: [statistics.median(p[i] for p in v) for i in range(3)] for k, v in phases.items()}
    opt_bytes = {k: _optimizer_bytes(o) for k, (_, o) in steps.items()}
    tokens = batch_size * seq
    rows = [{"model": label, "step": k, "ms": round(1e3 * med[k], 1), "tokens/s": round(tokens / med[k]),
             "vs full": round(med[k] / med["full"], 3), "vs lora": round(med[k] / med["lora"], 3),
             "forward ms": round(1e3 * part[k][0], 1), "backward ms": round(1e3 * part[k][1], 1),
             "optimizer ms": round(1e3 * part[k][2], 1), "cpu ms": round(1e3 * med_cpu[k], 1),
             "cpu vs full": round(med_cpu[k] / med_cpu["full"], 3),
             "optimizer MiB": round(opt_bytes[k] / 2**20, 2),
             "optimizer vs full": round(opt_bytes[k] / opt_bytes["full"], 4)} for k in steps]
    return rows, med, opt_bytes


def whole_preset_state_fraction(preset: str, rank: int) -> float:
    """LoRA's AdamW state over full fine-tuning's for the whole, uncut preset, counted on the meta device:
    both keep two fp32 moments per trainable element, so the ratio is trainable adapters / all parameters."""
    model = build_meta_model(_preset(preset))
    trainable, _ = lora_param_counts(model, LoRAConfig(rank=rank, alpha=2.0 * rank))
    return trainable / sum(p.numel() for p in model.parameters())


def run(args: list[str]) -> BenchResult:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench finetune")
    p.add_argument("--preset", action="append", default=None,
                   help="model preset, repeatable (default: small and deepseek_moe_16b); the goals are judged "
                        "on the last one")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(args)
    presets = a.preset or ["small", "deepseek_moe_16b"]
    rows, notes, goals = [], [], {}
    for preset in presets:
        cfg, label = bench_model(preset)
        batch = a.batch if preset not in CPU_CUTS else max(1, a.batch // 4)  # a few seconds per full step
        model_rows, med, opt_bytes = _measure(cfg, label, batch, a.seq, a.rank, a.rounds)
        rows += model_rows
        notes.append(f"{label}: batch {batch} x {a.seq} tokens, rank {a.rank}; LoRA / full step "
                     f"{med['lora'] / med['full']:.3f}, optimizer state {opt_bytes['lora'] / opt_bytes['full']:.4f} "
                     f"(the whole uncut {preset}: {whole_preset_state_fraction(preset, a.rank):.4f}, counted); "
                     f"dp / lora = {med['dp'] / med['lora']:.2f}")
        goals = {"lora_step_vs_full": Goal(med["lora"] / med["full"], 0.8, higher_is_better=False),
                 "lora_optimizer_state_vs_full": Goal(opt_bytes["lora"] / opt_bytes["full"], 0.02,
                                                      higher_is_better=False)}
    notes.append(f"goals judged on {label}; fp32, {torch.get_num_threads()} threads, "
                 f"{a.rounds} interleaved rounds (medians)")
    return BenchResult("finetune", rows, goals, notes)
