"""Measured privacy: secret canaries inserted into a fine-tuning set, and their exposure after a
LoRA fine-tune without and with DP-SGD, same data, same seed, same steps (Carlini et al., "The
Secret Sharer", 2019).

Format    a canary is `prefix_len` fixed tokens (the "the secret code is") followed by a secret of
          `secret_len` symbols, each one of `alphabet` tokens (the "digits"); prefix and alphabet
          are distinct token ids drawn from the seed. Secrets are drawn uniformly from the
          alphabet^secret_len space by a seeded generator.
Data      `n_filler` rows of random tokens (never a prefix token) and `insertions` copies of each
          of the `n_canaries` canary rows (the canary, then random tokens to the row's length),
          in the row format the fine-tuning ingest reads (tokens and a loss mask of seq_len + 1).
Exposure  the model's loss on the secret part only: the summed negative log-likelihood of the
          secret tokens given the prefix. Each secret is ranked among `n_candidates` random
          secrets of the same format (distinct, none of them inserted; ties count half), and
          exposure = log2(n_candidates + 1) - log2(rank): the rank among the n_candidates + 1
          sampled secrets estimates the fraction of the whole space that the model prefers, so
          this estimates log2|space| - log2(rank in the space) and is capped at
          log2(n_candidates + 1) (rank 1). A secret the model has not learned has a uniform rank
          and an expected exposure of about 1/ln 2 = 1.44 bits; the `n_controls` secrets of the
          same format that are never inserted measure that chance level on the same model.
Fine-tune `run_canary_experiment` fine-tunes the same base twice in this process (no Ray): both arms
          build the model with `build_finetune_model` and the optimizer and schedule as the worker
          does, and train on the same Poisson-sampled batches (rate expected_batch_size / rows,
          drawn from the canary seed, so both arms see the same examples; the worker draws them
          from OS entropy, with the same distribution). The private arm's step is
          `dp_sgd_step`, the very function the Ray Train worker runs (noise from OS entropy), with
          the noise multiplier `plan_noise` chooses for privacy.target_epsilon over train.steps;
          the plain arm's step is the training step on one process (`plain_step`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe.config import ConfigError
from moe.loss import IGNORE_INDEX, token_loss_sum
from moe.model import MoETransformer
from moe.parallel.apply import ParallelPlan
from moe.parallel.mesh import ParallelDims
from pipelines.finetune.config import (
    FinetuneConfig,
    check_privacy_settings,
    compose_finetune_config,
    with_base_model,
)
from pipelines.finetune.model import build_finetune_model
from pipelines.finetune.privacy import (
    dp_sgd_step,
    make_accountant,
    plan_noise,
    poisson_sample,
    secret_generator,
)
from pipelines.train.optim import build_optimizer, build_schedule

# The canary fine-tune's settings on top of conf/finetune.yaml: short rows, DP-SGD's expected batch
# of 32 (the plain arm trains on the same Poisson batches), a learning rate at which the plain arm
# memorizes within train.steps.
CANARY_OVERRIDES = ["data.seq_len=16", "train.steps=150", "optim.lr=0.01", "optim.warmup_steps=0",
                    "train.micro_batch_size=64", "privacy.expected_batch_size=32", "privacy.target_epsilon=8"]


def canary_finetune_config(overrides: list[str] | None = None) -> FinetuneConfig:
    """conf/finetune.yaml with a model preset (`+model=NAME`; tiny unless given) as the base's
    config, `CANARY_OVERRIDES`, then `overrides`; checked like a fine-tune of that base."""
    overrides = list(overrides or [])
    preset = [] if any(o.startswith("+model=") for o in overrides) else ["+model=tiny"]
    cfg = compose_finetune_config([*preset, *CANARY_OVERRIDES, *overrides])
    return with_base_model(cfg, cfg.model)


@dataclass
class CanaryConfig:
    n_canaries: int = 8  # secrets inserted into the training set
    insertions: int = 4  # copies of each canary in the training set
    n_controls: int = 8  # secrets of the same format never inserted: the chance level
    n_candidates: int = 1023  # random secrets each one is ranked among (exposure <= log2(1024) = 10 bits)
    prefix_len: int = 4
    secret_len: int = 6
    alphabet: int = 10
    n_filler: int = 256  # random-token rows beside the canaries
    seed: int = 0

    def validate(self, vocab_size: int, row_len: int) -> CanaryConfig:
        """Raise ConfigError naming the field and the fix; `row_len` is seq_len + 1 tokens."""
        for key in ("n_canaries", "insertions", "n_candidates", "prefix_len", "secret_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"canary.{key}={getattr(self, key)} must be >= 1.")
        if self.n_controls < 0 or self.n_filler < 0:
            raise ConfigError(f"canary.n_controls={self.n_controls} and canary.n_filler={self.n_filler} must be >= 0.")
        if self.alphabet < 2:
            raise ConfigError(f"canary.alphabet={self.alphabet} must be >= 2 (10 for digits).")
        if self.prefix_len + self.alphabet + 1 > vocab_size:
            raise ConfigError(f"canary.prefix_len + canary.alphabet = {self.prefix_len + self.alphabet} leaves no "
                              f"filler token in the model's vocabulary of {vocab_size}; lower them.")
        if self.prefix_len + self.secret_len > row_len:
            raise ConfigError(f"a canary of canary.prefix_len + canary.secret_len = {self.prefix_len + self.secret_len}"
                              f" tokens does not fit a row of data.seq_len + 1 = {row_len}; raise data.seq_len.")
        drawn = self.n_canaries + self.n_controls + self.n_candidates
        if self.alphabet ** self.secret_len < 2 * drawn:
            raise ConfigError(f"canary.alphabet^canary.secret_len = {self.alphabet ** self.secret_len} secrets are too "
                              f"few to draw {drawn} distinct ones (canaries, controls, candidates) at random; raise "
                              "canary.secret_len or lower canary.n_candidates.")
        return self


@dataclass
class CanarySet:
    """The format's token ids and the drawn secrets (rows of symbol indices into `alphabet_ids`)."""

    prefix_ids: torch.Tensor  # (prefix_len,)
    alphabet_ids: torch.Tensor  # (alphabet,)
    canaries: torch.Tensor  # (n_canaries, secret_len) inserted
    controls: torch.Tensor  # (n_controls, secret_len) never inserted
    candidates: torch.Tensor  # (n_candidates, secret_len) the reference sample

    def tokens(self, secrets: torch.Tensor) -> torch.Tensor:
        """(n, prefix_len + secret_len) token ids of the prefix followed by each secret."""
        return torch.cat([self.prefix_ids.expand(len(secrets), -1), self.alphabet_ids[secrets]], dim=1)


def make_canaries(c: CanaryConfig, vocab_size: int) -> CanarySet:
    """The format (prefix and alphabet ids) and distinct secrets: canaries, controls, candidates."""
    gen = torch.Generator().manual_seed(c.seed)
    ids = torch.randperm(vocab_size, generator=gen)[:c.prefix_len + c.alphabet]
    n = c.n_canaries + c.n_controls + c.n_candidates
    seen: set[tuple[int, ...]] = set()
    rows: list[torch.Tensor] = []
    while len(rows) < n:  # rejection: the space is at least twice the draws (validate)
        row = torch.randint(0, c.alphabet, (c.secret_len,), generator=gen)
        key = tuple(row.tolist())
        if key not in seen:
            seen.add(key)
            rows.append(row)
    secrets = torch.stack(rows)
    a, b = c.n_canaries, c.n_canaries + c.n_controls
    return CanarySet(ids[:c.prefix_len], ids[c.prefix_len:], secrets[:a], secrets[a:b], secrets[b:])


def canary_rows(c: CanaryConfig, s: CanarySet, vocab_size: int, row_len: int) -> dict[str, torch.Tensor]:
    """The training set in the ingest's row format: `tokens` and `loss_mask` (rows, row_len), the
    `insertions` copies of every canary (each followed by random tokens) and the filler rows, in a
    seeded random order; `canary` (rows,) is the canary index of a row, -1 for filler."""
    gen = torch.Generator().manual_seed(c.seed + 1)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[s.prefix_ids] = False  # the prefix appears in canaries only
    pool = torch.nonzero(allowed).flatten()
    n_rows = c.n_filler + c.n_canaries * c.insertions
    tokens = pool[torch.randint(0, len(pool), (n_rows, row_len), generator=gen)]
    which = torch.cat([torch.arange(c.n_canaries).repeat_interleave(c.insertions),
                       torch.full((c.n_filler,), -1, dtype=torch.long)])
    canary_tokens = s.tokens(s.canaries)
    inserted = which >= 0
    tokens[inserted, :canary_tokens.shape[1]] = canary_tokens[which[inserted]]
    order = torch.randperm(n_rows, generator=gen)
    return {"tokens": tokens[order].to(torch.int64), "loss_mask": torch.ones(n_rows, row_len, dtype=torch.uint8),
            "canary": which[order]}


@torch.no_grad()
def secret_nll(model: MoETransformer, s: CanarySet, secrets: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(n,) summed negative log-likelihood (nats) of each secret's tokens given the prefix, in eval mode."""
    was_training = model.training
    model.eval()
    p = len(s.prefix_ids)
    out = []
    for lo in range(0, len(secrets), batch):
        seq = s.tokens(secrets[lo:lo + batch]).to(model.rope_cos.device)
        logp = torch.log_softmax(model(seq[:, :-1]).float(), dim=-1)[:, p - 1:]  # the positions predicting the secret
        out.append(-logp.gather(-1, seq[:, p:, None]).squeeze(-1).sum(1).cpu())
    model.train(was_training)
    return torch.cat(out)


def exposure(nll: torch.Tensor, candidate_nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exposure in bits, rank) of each secret against the candidates: rank = 1 + candidates with a
    lower loss + half the candidates with an equal one; exposure = log2(candidates + 1) - log2(rank)."""
    lower = (candidate_nll[None, :] < nll[:, None]).sum(1)
    equal = (candidate_nll[None, :] == nll[:, None]).sum(1)
    rank = 1.0 + lower.double() + 0.5 * equal.double()
    return math.log2(len(candidate_nll) + 1) - torch.log2(rank), rank


def plain_step(model: MoETransformer, plan: ParallelPlan, opt: torch.optim.Optimizer, sched: object,
               batch: dict[str, torch.Tensor], grad_clip: float) -> float:
    """The non-private training step (pipelines/train/worker.py `Trainer.train_step`) on one process
    and one micro-batch: the batch's mean token loss, gradient sync (none on one process), clipping
    to optim.grad_clip, optimizer and schedule step. Returns the loss."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    targets = torch.where(mask[:, 1:] > 0, tokens[:, 1:], IGNORE_INDEX)
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    loss = token_loss_sum(model(tokens[:, :-1]), targets) / count
    loss.backward()
    plan.sync_gradients()
    plan.clip_grad_norm_(grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    plan.reduce_expert_loads()
    return float(loss.detach())


@dataclass
class ArmResult:
    """One fine-tune's measurement: per canary and per control secret, exposure (bits) and rank."""

    private: bool
    exposure: list[float]
    rank: list[float]
    control_exposure: list[float]
    final_loss: float  # mean training loss over the last 10% of the steps
    epsilon: float | None  # spent (the accountant's, after the last step)
    seconds: float

    @property
    def mean_exposure(self) -> float:
        return sum(self.exposure) / len(self.exposure)

    @property
    def mean_control_exposure(self) -> float:
        return sum(self.control_exposure) / len(self.control_exposure) if self.control_exposure else math.nan


@dataclass
class CanaryReport:
    canary: CanaryConfig
    rows: int  # training rows (filler and canary copies)
    steps: int
    sample_rate: float
    noise_multiplier: float
    planned_epsilon: float
    max_exposure: float  # log2(n_candidates + 1)
    arms: dict[str, ArmResult] = field(default_factory=dict)  # "plain", "dp"

    def summary_lines(self) -> list[str]:
        c = self.canary
        lines = [f"{c.n_canaries} canaries x {c.insertions} insertions among {self.rows} rows, {self.steps} steps, "
                 f"sample rate {self.sample_rate:.4g}; each ranked among {c.n_candidates} random secrets "
                 f"(exposure <= {self.max_exposure:.2f} bits, chance ~1.44)"]
        for name, a in self.arms.items():
            eps = f", epsilon {a.epsilon:.3f} (noise multiplier {self.noise_multiplier:.4g})" if a.private else ""
            lines.append(f"{name}: exposure mean {a.mean_exposure:.2f} bits (min {min(a.exposure):.2f}, "
                         f"max {max(a.exposure):.2f}), {sum(r == 1 for r in a.rank)}/{len(a.rank)} at rank 1, "
                         f"controls {a.mean_control_exposure:.2f} bits; final loss {a.final_loss:.3f}{eps}; "
                         f"{a.seconds:.1f} s")
        return lines


def run_canary_experiment(cfg: FinetuneConfig, c: CanaryConfig, base_dir: Path | None = None) -> CanaryReport:
    """Fine-tune `cfg` (its model set, e.g. by `with_base_model`) on the canary set twice in this
    process, without and with DP-SGD at cfg.privacy (target_epsilon, delta, max_grad_norm,
    expected_batch_size, accountant; `enabled` is ignored), and measure both (module docstring).
    The settings must be those DP-SGD accepts (`check_privacy_settings`), for both arms alike."""
    row_len = cfg.data.seq_len + 1
    c.validate(cfg.model.vocab_size, row_len)
    private_cfg = copy.deepcopy(cfg)
    private_cfg.privacy.enabled = True
    private_cfg.privacy.noise_multiplier = None
    check_privacy_settings(private_cfg)
    s = make_canaries(c, cfg.model.vocab_size)
    data = canary_rows(c, s, cfg.model.vocab_size, row_len)
    n, steps = len(data["tokens"]), cfg.train.steps
    q, sigma, planned = plan_noise(private_cfg.privacy, n, steps)
    private_cfg.privacy.noise_multiplier = sigma
    gen = torch.Generator().manual_seed(c.seed + 2)
    batches = [poisson_sample(n, q, gen) for _ in range(steps)]  # the same examples for both arms
    report = CanaryReport(c, n, steps, q, sigma, planned, math.log2(c.n_candidates + 1))
    for name, private in (("plain", False), ("dp", True)):
        report.arms[name] = _fine_tune(private_cfg, data, batches, q, s, private, base_dir)
    return report


def _fine_tune(cfg: FinetuneConfig, data: dict[str, torch.Tensor], batches: list[torch.Tensor], sample_rate: float,
               s: CanarySet, private: bool, base_dir: Path | None) -> ArmResult:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)  # adapter dropout draws alike in both arms
    device = torch.device("cpu")
    dims = ParallelDims.from_degrees(1, n_experts=cfg.model.moe.n_routed_experts)
    model, plan = build_finetune_model(cfg, dims, device, base_dir)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg.optim)
    sched = build_schedule(opt, cfg.optim, cfg.train.steps)
    p = cfg.privacy
    accountant = make_accountant(p.accountant) if private else None
    noise = secret_generator() if private else None
    losses = []
    for step, idx in enumerate(batches, start=1):
        batch = {k: data[k][idx] for k in ("tokens", "loss_mask")}
        if private:
            loss_sum, _ = dp_sgd_step(model, params, opt, sched, batch, p, accountant, sample_rate, step,
                                      cfg.train.micro_batch_size, device, 0, noise)
            plan.reduce_expert_loads()
            losses.append(loss_sum / max(1, len(idx)))
        elif len(idx):
            losses.append(plain_step(model, plan, opt, sched, batch, cfg.optim.grad_clip))
        else:  # an empty Poisson sample: the private arm still steps (noise only); here only the schedule
            sched.step()
    cand = secret_nll(model, s, s.candidates)
    exp, rank = exposure(secret_nll(model, s, s.canaries), cand)
    ctrl, _ = exposure(secret_nll(model, s, s.controls), cand) if len(s.controls) else (torch.empty(0), None)
    tail = losses[-max(1, len(losses) // 10):]
    eps = float(accountant.get_epsilon(p.delta)) if accountant is not None else None
    return ArmResult(private, exp.tolist(), rank.tolist(), ctrl.tolist(), sum(tail) / len(tail), eps,
                     time.perf_counter() - t0)
