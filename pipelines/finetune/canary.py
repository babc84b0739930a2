"""Measured privacy: secret canaries inserted into a fine-tuning set, and their exposure after a
LoRA fine-tune without and with DP-SGD, same data, same seed, same steps (Carlini et al., "The
Secret Sharer", 2019).

Format    a canary is its owner's token, `template_len` shared tokens and a secret of `secret_len`
          symbols, each one of `alphabet` tokens ("<name> 's secret code is 4 8 1 5 9 2"); owners,
          template and alphabet are distinct token ids drawn from the seed. Secrets are drawn
          uniformly from the alphabet^secret_len space by a seeded generator. Each canary has an
          owner of its own, so a model can tie each secret to its owner, as it would a user's.
Data      `n_filler` rows of filler text (a seeded random bigram chain, `branching` successors per
          token, never an owner or template token) and `insertions` copies of each of the `n_canaries` canary
          rows (the canary, then the chain continued), in the row format the fine-tuning ingest
          reads (tokens and a loss mask of seq_len + 1).
Exposure  the model's loss on the secret part only: the summed negative log-likelihood of the
          secret tokens given the owner and the template. Each secret is ranked among
          `n_candidates` random secrets of the same format under the same owner (distinct, none
          of them inserted; ties count half), and
          exposure = log2(n_candidates + 1) - log2(rank): the rank among the n_candidates + 1
          sampled secrets estimates the fraction of the whole space that the model prefers, so
          this estimates log2|space| - log2(rank in the space) and is capped at
          log2(n_candidates + 1) (rank 1). A secret the model has not learned has a uniform rank
          and an expected exposure of about 1/ln 2 = 1.44 bits; the `n_controls` secrets of owners
          who are not in the training set measure that chance level on the same model.
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
CANARY_OVERRIDES = ["data.seq_len=12", "train.steps=150", "optim.lr=0.01", "optim.warmup_steps=0",
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
    n_canaries: int = 8  # secrets inserted into the training set, each of its own owner
    insertions: int = 4  # copies of each canary in the training set
    n_controls: int = 8  # secrets of owners never in the training set: the chance level
    n_candidates: int = 1023  # random secrets each one is ranked among (exposure <= log2(1024) = 10 bits)
    template_len: int = 3  # the shared words between the owner and the secret ("'s secret code is")
    secret_len: int = 6
    alphabet: int = 10
    n_filler: int = 256  # rows of filler text beside the canaries
    branching: int = 4  # successors per token in the filler text (a seeded random bigram chain)
    seed: int = 0

    @property
    def canary_len(self) -> int:
        return 1 + self.template_len + self.secret_len

    def validate(self, vocab_size: int, row_len: int) -> CanaryConfig:
        """Raise ConfigError naming the field and the fix; `row_len` is seq_len + 1 tokens."""
        for key in ("n_canaries", "insertions", "n_candidates", "template_len", "secret_len", "branching"):
            if getattr(self, key) < 1:
                raise ConfigError(f"canary.{key}={getattr(self, key)} must be >= 1.")
        if self.n_controls < 0 or self.n_filler < 0:
            raise ConfigError(f"canary.n_controls={self.n_controls} and canary.n_filler={self.n_filler} must be >= 0.")
        if self.alphabet < 2:
            raise ConfigError(f"canary.alphabet={self.alphabet} must be >= 2 (10 for digits).")
        reserved = self.n_canaries + self.n_controls + self.template_len + self.alphabet
        if reserved >= vocab_size:
            raise ConfigError(f"the canary format reserves {reserved} token ids (canary.n_canaries + n_controls owners, "
                              f"template_len, alphabet), leaving no filler token in the model's vocabulary of "
                              f"{vocab_size}; lower them.")
        if self.canary_len > row_len:
            raise ConfigError(f"a canary of 1 + canary.template_len + canary.secret_len = {self.canary_len} tokens does "
                              f"not fit a row of data.seq_len + 1 = {row_len}; raise data.seq_len.")
        drawn = self.n_canaries + self.n_controls + self.n_candidates
        if self.alphabet ** self.secret_len < 2 * drawn:
            raise ConfigError(f"canary.alphabet^canary.secret_len = {self.alphabet ** self.secret_len} secrets are too "
                              f"few to draw {drawn} distinct ones (canaries, controls, candidates) at random; raise "
                              "canary.secret_len or lower canary.n_candidates.")
        return self


@dataclass
class CanarySet:
    """The format's token ids and the drawn secrets (rows of symbol indices into `alphabet_ids`).
    Owner i < n_canaries owns canary i; owner n_canaries + j owns control j."""

    owner_ids: torch.Tensor  # (n_canaries + n_controls,)
    template_ids: torch.Tensor  # (template_len,)
    alphabet_ids: torch.Tensor  # (alphabet,)
    canaries: torch.Tensor  # (n_canaries, secret_len) inserted
    controls: torch.Tensor  # (n_controls, secret_len) never inserted
    candidates: torch.Tensor  # (n_candidates, secret_len) the reference sample

    @property
    def prefix_len(self) -> int:
        return 1 + len(self.template_ids)

    def tokens(self, owners: torch.Tensor, secrets: torch.Tensor) -> torch.Tensor:
        """(n, 1 + template_len + secret_len) token ids: owner, template, secret, row by row."""
        n = len(secrets)
        return torch.cat([self.owner_ids[owners][:, None], self.template_ids.expand(n, -1), self.alphabet_ids[secrets]],
                         dim=1)


def make_canaries(c: CanaryConfig, vocab_size: int) -> CanarySet:
    """The format (owner, template and alphabet ids, all distinct) and distinct secrets: canaries,
    controls, candidates."""
    gen = torch.Generator().manual_seed(c.seed)
    n_owners = c.n_canaries + c.n_controls
    ids = torch.randperm(vocab_size, generator=gen)
    owners, template = ids[:n_owners], ids[n_owners:n_owners + c.template_len]
    alphabet = ids[n_owners + c.template_len:n_owners + c.template_len + c.alphabet]
    n = n_owners + c.n_candidates
    seen: set[tuple[int, ...]] = set()
    rows: list[torch.Tensor] = []
    while len(rows) < n:  # rejection: the space is at least twice the draws (validate)
        row = torch.randint(0, c.alphabet, (c.secret_len,), generator=gen)
        key = tuple(row.tolist())
        if key not in seen:
            seen.add(key)
            rows.append(row)
    secrets = torch.stack(rows)
    return CanarySet(owners, template, alphabet, secrets[:c.n_canaries], secrets[c.n_canaries:n_owners],
                     secrets[n_owners:])


def canary_rows(c: CanaryConfig, s: CanarySet, vocab_size: int, row_len: int) -> dict[str, torch.Tensor]:
    """The training set in the ingest's row format: `tokens` and `loss_mask` (rows, row_len), the
    `insertions` copies of every canary and the filler rows, in a seeded random order; `canary`
    (rows,) is the canary index of a row, -1 for filler. The text around the canaries is a seeded
    random bigram chain (each token has `branching` possible successors, never an owner or template
    token): learnable, like language, so that fitting it does not drown the canaries; a canary row
    is the canary, then the chain continued from its last token."""
    gen = torch.Generator().manual_seed(c.seed + 1)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[s.owner_ids] = False  # owners and the template appear in canaries only
    allowed[s.template_ids] = False
    pool = torch.nonzero(allowed).flatten()
    successors = pool[torch.randint(0, len(pool), (vocab_size, c.branching), generator=gen)]
    n_rows = c.n_filler + c.n_canaries * c.insertions
    which = torch.cat([torch.arange(c.n_canaries).repeat_interleave(c.insertions),
                       torch.full((c.n_filler,), -1, dtype=torch.long)])
    inserted = which >= 0
    owner = which.clamp(min=0)
    canary_tokens = s.tokens(owner, s.canaries[owner])  # (rows, canary_len), used where inserted
    tokens = torch.empty(n_rows, row_len, dtype=torch.int64)
    tokens[:, 0] = pool[torch.randint(0, len(pool), (n_rows,), generator=gen)]
    for t in range(row_len):
        if t > 0:
            tokens[:, t] = successors[tokens[:, t - 1], torch.randint(0, c.branching, (n_rows,), generator=gen)]
        if t < canary_tokens.shape[1]:
            tokens[:, t] = torch.where(inserted, canary_tokens[:, t], tokens[:, t])
    order = torch.randperm(n_rows, generator=gen)
    return {"tokens": tokens[order], "loss_mask": torch.ones(n_rows, row_len, dtype=torch.uint8),
            "canary": which[order]}


@torch.no_grad()
def secret_nll(model: MoETransformer, s: CanarySet, owners: torch.Tensor, secrets: torch.Tensor,
               batch: int = 1024) -> torch.Tensor:
    """(n,) summed negative log-likelihood (nats) of each secret's tokens given its owner's prefix,
    in eval mode."""
    was_training = model.training
    model.eval()
    p = s.prefix_len
    out = []
    for lo in range(0, len(secrets), batch):
        seq = s.tokens(owners[lo:lo + batch], secrets[lo:lo + batch]).to(model.rope_cos.device)
        logp = torch.log_softmax(model(seq[:, :-1]).float(), dim=-1)[:, p - 1:]  # the positions predicting the secret
        out.append(-logp.gather(-1, seq[:, p:, None]).squeeze(-1).sum(1).cpu())
    model.train(was_training)
    return torch.cat(out)


def exposure(nll: torch.Tensor, candidate_nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exposure in bits, rank) of each of the (M,) secrets against its candidates ((N,) shared or
    (M, N)): rank = 1 + candidates with a lower loss + half those with an equal one; exposure =
    log2(N + 1) - log2(rank)."""
    lower = (candidate_nll < nll[:, None]).sum(-1)
    equal = (candidate_nll == nll[:, None]).sum(-1)
    rank = 1.0 + lower.double() + 0.5 * equal.double()
    return math.log2(candidate_nll.shape[-1] + 1) - torch.log2(rank), rank


def measure(model: MoETransformer, s: CanarySet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exposure, rank) of every canary and the exposure of every control, each secret ranked among
    the candidates under its own owner's prefix."""
    owners = torch.arange(len(s.owner_ids))
    secrets = torch.cat([s.canaries, s.controls])
    n = len(s.candidates)
    cand = secret_nll(model, s, owners.repeat_interleave(n), s.candidates.repeat(len(owners), 1))
    bits, rank = exposure(secret_nll(model, s, owners, secrets), cand.view(len(owners), n))
    k = len(s.canaries)
    return bits[:k], rank[:k], bits[k:]


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
    The settings must be those DP-SGD accepts (`check_privacy_settings`), for both arms alike. Torch
    runs with the worker's threads (train.num_threads, else cluster.cpus_per_worker) meanwhile."""
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
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.num_threads or max(1, int(cfg.cluster.cpus_per_worker)))  # as a worker does
    try:
        for name, private in (("plain", False), ("dp", True)):
            report.arms[name] = _fine_tune(private_cfg, data, batches, q, s, private, base_dir)
    finally:
        torch.set_num_threads(threads)
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
            loss_sum, _, _ = dp_sgd_step(model, params, opt, sched, batch, p, accountant, sample_rate, step,
                                      cfg.train.micro_batch_size, device, 0, noise)
            plan.reduce_expert_loads()
            losses.append(loss_sum / max(1, len(idx)))
        elif len(idx):
            losses.append(plain_step(model, plan, opt, sched, batch, cfg.optim.grad_clip))
        else:  # an empty Poisson sample: the private arm still steps (noise only); here only the schedule
            sched.step()
    exp, rank, ctrl = measure(model, s)
    tail = losses[-max(1, len(losses) // 10):]
    eps = float(accountant.get_epsilon(p.delta)) if accountant is not None else None
    return ArmResult(private, exp.tolist(), rank.tolist(), ctrl.tolist(), sum(tail) / len(tail), eps,
                     time.perf_counter() - t0)
