"""DP-SGD pieces: the noise multiplier for a target epsilon and the accountant (opacus), Poisson
sampling, per-example clipping and the Gaussian noise over data-parallel ranks.

One step: every example of the training set is in the step's batch independently with probability
q = expected_batch_size / examples (each rank samples its own disjoint shard; the union is a Poisson
sample of the whole set). Each example's adapter gradient (exact, `moe.lora.capture_per_example`) is
clipped to max_grad_norm C; the clipped sums are added over the ranks, Gaussian noise of standard
deviation noise_multiplier x C is added once (drawn on rank 0 from OS entropy, never from the run's
seed), and the result is divided by the expected batch size. The accountant composes the steps.
`dp_sgd_step` is that one step, optimizer and schedule included: the Ray Train worker
(pipelines/finetune/worker.py) and the in-process canary measurement (pipelines/finetune/canary.py)
both call it.
"""

from __future__ import annotations

import secrets
import warnings
from typing import Any

import torch
import torch.distributed as dist

from moe.lora import capture_per_example
from moe.loss import IGNORE_INDEX
from pipelines.finetune.config import PrivacyConfig


class PrivacyBudgetError(ValueError):
    """The target epsilon cannot be met (or was reached); the message says what to change."""


def make_accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if kind == "rdp" else PRVAccountant()


def epsilon_after(p: PrivacyConfig, noise_multiplier: float, sample_rate: float, steps: int) -> float:
    acc = make_accountant(p.accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(p.delta))


NOISE_CEILING = 1e4  # a noise multiplier above it drowns any batch's gradient: a target that needs more is refused


def plan_noise(p: PrivacyConfig, n_examples: int, steps: int) -> tuple[float, float, float]:
    """(sample rate, noise multiplier, epsilon after `steps`); PrivacyBudgetError when the target
    cannot be met with these settings (nor with a noise multiplier up to `NOISE_CEILING`)."""
    from opacus.accountants.utils import get_noise_multiplier

    if p.expected_batch_size > n_examples:
        raise PrivacyBudgetError(f"privacy.expected_batch_size={p.expected_batch_size} exceeds the {n_examples} "
                                 "training examples; lower it.")
    q = p.expected_batch_size / n_examples
    sigma = p.noise_multiplier
    if sigma is None:
        unmet = (f"privacy.target_epsilon={p.target_epsilon} cannot be met in {steps} steps at sample rate {q:.4g} "
                 f"(delta {p.delta}): {{}} Raise the target, lower train.steps or privacy.expected_batch_size, or "
                 "add data.")
        floor = epsilon_after(p, NOISE_CEILING, q, steps)  # the accountant's floor, found without a long search
        if floor > p.target_epsilon:
            raise PrivacyBudgetError(unmet.format(f"even noise multiplier {NOISE_CEILING:g} spends epsilon "
                                                  f"{floor:.3f}."))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sigma = get_noise_multiplier(target_epsilon=p.target_epsilon, target_delta=p.delta, sample_rate=q,
                                             steps=steps, accountant=p.accountant)
        except ValueError as err:
            raise PrivacyBudgetError(unmet.format(err)) from err
    eps = epsilon_after(p, sigma, q, steps)
    if eps > p.target_epsilon * 1.0001:
        raise PrivacyBudgetError(
            f"privacy.noise_multiplier={sigma} spends epsilon {eps:.3f} in {steps} steps, over "
            f"privacy.target_epsilon={p.target_epsilon}; raise the noise multiplier, lower train.steps, or set "
            "privacy.noise_multiplier=null to have it chosen.")
    return q, float(sigma), eps


def poisson_sample(n_rows: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the rows in this step's batch: each independently with probability `rate`."""
    return torch.nonzero(torch.rand(n_rows, generator=generator) < rate).flatten()


def secret_generator() -> torch.Generator:
    """Sampling and noise draw from OS entropy: the run's seed is no secret."""
    return torch.Generator().manual_seed(secrets.randbits(63))


@torch.no_grad()
def clip_into(params: list[torch.nn.Parameter], sums: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Add each example's gradient, scaled to norm <= max_norm, into `sums`; clears `grad_sample`.
    Returns the per-example norms before clipping."""
    samples = [p.grad_sample for p in params]
    norms = torch.sqrt(sum(s.flatten(1).pow(2).sum(1) for s in samples))
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for total, s in zip(sums, samples, strict=True):
        total.add_(torch.einsum("b,b...->...", factor, s))
    for p in params:
        p.grad_sample = None
    return norms


@torch.no_grad()
def noisy_mean(params: list[torch.nn.Parameter], sums: list[torch.Tensor], noise_std: float, expected_batch: int,
               rank: int, generator: torch.Generator | None) -> None:
    """p.grad = (sum over ranks of the clipped sums + N(0, noise_std^2) drawn once, on rank 0) / expected_batch."""
    flat = torch.cat([s.flatten() for s in sums])
    if rank == 0:
        flat += (torch.randn(flat.shape, generator=generator, dtype=torch.float64) * noise_std).to(flat)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)
    flat /= expected_batch
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def clipped_example_sums(model: torch.nn.Module, params: list[torch.nn.Parameter], batch: dict[str, torch.Tensor],
                         sums: list[torch.Tensor], max_norm: float, micro_batch_size: int, device: torch.device
                         ) -> float:
    """Per-example gradients of each example's mean token loss (over its loss mask), clipped into
    `sums`, `micro_batch_size` examples at a time; returns the sum of the examples' losses."""
    loss_sum = 0.0
    for lo in range(0, len(batch["tokens"]), micro_batch_size):
        tokens = batch["tokens"][lo:lo + micro_batch_size].to(device)
        mask = batch["loss_mask"][lo:lo + micro_batch_size].to(device)
        targets = torch.where(mask[:, 1:] > 0, tokens[:, 1:], IGNORE_INDEX)
        with capture_per_example(len(tokens), targets.shape[1]):
            logits = model(tokens[:, :-1])
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="none")
            per_example = ce.view(len(tokens), -1).sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)
            per_example.sum().backward()
        clip_into(params, sums, max_norm)
        for t in params:
            t.grad = None
        loss_sum += float(per_example.detach().sum())
    return loss_sum


def dp_sgd_step(model: torch.nn.Module, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                sched: Any, batch: dict[str, torch.Tensor], p: PrivacyConfig, accountant: Any, sample_rate: float,
                step: int, micro_batch_size: int, device: torch.device, rank: int,
                generator: torch.Generator | None) -> tuple[float, float, float]:
    """One DP-SGD step on this rank's Poisson sample `batch` (rows `tokens`, `loss_mask`): the
    accountant composes it first (PrivacyBudgetError, naming `step`, when that would pass
    p.target_epsilon), then the clipped per-example sums, the noised mean over the ranks
    (`p.noise_multiplier` x `p.max_grad_norm`, rank 0's `generator`), the optimizer and the schedule
    step. Collective under torch.distributed. Returns (this rank's sum of example losses, the norm
    of the noised gradient, the epsilon spent after this step)."""
    if p.noise_multiplier is None:
        raise PrivacyBudgetError("privacy.noise_multiplier is unset; plan it first with plan_noise (the driver does).")
    sigma = float(p.noise_multiplier)
    accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spent = float(accountant.get_epsilon(p.delta))
    if spent > p.target_epsilon * 1.0001:
        raise PrivacyBudgetError(f"step {step} would spend epsilon {spent:.3f}, over "
                                 f"privacy.target_epsilon={p.target_epsilon}; the run stops here.")
    sums = [torch.zeros_like(t) for t in params]
    loss_sum = clipped_example_sums(model, params, batch, sums, p.max_grad_norm, micro_batch_size, device)
    noisy_mean(params, sums, sigma * p.max_grad_norm, p.expected_batch_size, rank, generator)
    grad_norm = float(torch.sqrt(sum(t.grad.pow(2).sum() for t in params)))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, spent
