"""Measured privacy (pipelines/finetune/canary.py): exposure from ranks, the canary training set,
the refused settings, and the canary test itself: after a LoRA fine-tune of the tiny model on a set
with inserted canaries, their exposure is high without DP and markedly lower with DP-SGD at epsilon
8 (the Ray Train worker's `dp_sgd_step`), same data, same seed, same steps, in one run."""

from __future__ import annotations

import math

import pytest
import torch

from moe.config import ConfigError
from pipelines.bench.canary import DROP_BITS, HIGH_BITS
from pipelines.finetune.canary import (
    CanaryConfig,
    canary_finetune_config,
    canary_rows,
    exposure,
    make_canaries,
    run_canary_experiment,
)


def test_exposure_is_log2_candidates_plus_one_minus_log2_rank() -> None:
    candidates = torch.arange(1, 1024, dtype=torch.float64)  # 1023 candidate losses
    bits, rank = exposure(torch.tensor([0.5, 1.0, 2000.0, 511.5], dtype=torch.float64), candidates)
    per_secret, _ = exposure(torch.tensor([0.5, 0.5]), torch.stack([candidates, candidates - 1]))
    assert per_secret.tolist() == [10.0, 9.0]  # (M, N): each secret against its own row (0 < 0.5 in the second)
    assert rank.tolist() == [1.0, 1.5, 1024.0, 512.0]  # lower than all; a tie counts half; above all
    torch.testing.assert_close(bits, 10.0 - torch.log2(rank))
    assert bits[0] == 10.0 and bits[2] == 0.0
    # a model that scores every secret alike exposes about 1 bit, not the cap (ties count half)
    flat, _ = exposure(torch.full((3,), 7.0), torch.full((1023,), 7.0))
    assert torch.allclose(flat, torch.full((3,), 10.0 - math.log2(512.5), dtype=torch.float64))


def test_each_canary_is_inserted_as_often_as_asked_and_the_draws_are_distinct() -> None:
    c = CanaryConfig(n_canaries=3, insertions=5, n_controls=2, n_candidates=50, n_filler=20, seed=3)
    s = make_canaries(c, vocab_size=512)
    rows = canary_rows(c, s, vocab_size=512, row_len=17)
    assert rows["tokens"].shape == rows["loss_mask"].shape == (20 + 3 * 5, 17) and bool(rows["loss_mask"].all())
    drawn = torch.cat([s.canaries, s.controls, s.candidates])
    assert len({tuple(r) for r in drawn.tolist()}) == 3 + 2 + 50
    format_ids = torch.cat([s.owner_ids, s.template_ids, s.alphabet_ids])
    assert len(set(format_ids.tolist())) == 3 + 2 + 3 + 10 and int(format_ids.max()) < 512
    head = rows["tokens"][:, :c.canary_len]
    for i, tokens in enumerate(s.tokens(torch.arange(3), s.canaries)):
        at = (head == tokens).all(1)
        assert int(at.sum()) == 5 and bool((rows["canary"][at] == i).all())
    filler = rows["tokens"][rows["canary"] < 0]
    assert not torch.isin(filler, torch.cat([s.owner_ids, s.template_ids])).any()  # in canary rows only
    pairs = torch.stack([filler[:, :-1].flatten(), filler[:, 1:].flatten()], 1).unique(dim=0)
    assert int(pairs[:, 0].bincount().max()) <= c.branching  # the filler is a chain of few successors per token
    again = canary_rows(c, make_canaries(c, 512), 512, 17)
    assert torch.equal(again["tokens"], rows["tokens"])  # the seed decides it all


def test_bad_canary_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"canary.alphabet\^canary.secret_len = 100 secrets are too few"):
        CanaryConfig(secret_len=2).validate(vocab_size=512, row_len=17)
    with pytest.raises(ConfigError, match="= 19 tokens does not fit a row of data.seq_len"):
        CanaryConfig(template_len=12).validate(vocab_size=512, row_len=17)
    with pytest.raises(ConfigError, match="canary.insertions=0 must be >= 1"):
        CanaryConfig(insertions=0).validate(vocab_size=512, row_len=17)
    with pytest.raises(ConfigError, match="privacy.enabled=true refuses balance.aux_loss_coef"):
        run_canary_experiment(canary_finetune_config(["balance.aux_loss_coef=0.01"]), CanaryConfig())


def test_dp_sgd_at_epsilon_8_lowers_the_canaries_exposure() -> None:
    """The canary test: the defaults of the canary benchmark, one run, both arms. Measured (seed 0,
    README): 9.88 bits and 7/8 at rank 1 without DP (deterministic), 1.20-1.38 bits with DP in three
    runs (OS-entropy noise); about 15-20 s on 2 loaded cores."""
    report = run_canary_experiment(canary_finetune_config(), CanaryConfig())
    plain, dp = report.arms["plain"], report.arms["dp"]
    print("\n".join(report.summary_lines()))
    assert report.max_exposure == 10.0
    assert plain.epsilon is None and 7.5 < dp.epsilon <= 8.0 * 1.0001  # the budget is spent, not exceeded
    assert plain.mean_exposure >= HIGH_BITS, plain
    assert sum(r == 1 for r in plain.rank) >= 6, plain  # most canaries rank first among 1023 random secrets
    assert plain.mean_exposure - dp.mean_exposure >= DROP_BITS, (plain, dp)
    for arm in (plain, dp):  # secrets never inserted stay at chance level (about 1.44 bits) on both models
        assert arm.mean_control_exposure < 4.0, arm
