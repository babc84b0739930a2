"""Language-model scores: next-token loss, perplexity and bits per byte over masked token rows, and
the log-likelihood of continuations (multiple choice). One forward pass per batch, fp32 sums.

bits per byte = (sum of next-token losses in nats) / ln 2 / (UTF-8 bytes of the scored tokens): it
compares models with different tokenizers, which loss per token does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe.model import MoETransformer


@dataclass
class LMScore:
    nll_sum: float  # nats
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else math.nan

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/loss": self.loss, f"{prefix}/perplexity": self.perplexity,
                f"{prefix}/bits_per_byte": self.bits_per_byte, f"{prefix}/tokens": float(self.tokens)}


@torch.no_grad()
def token_nll(model: MoETransformer, tokens_BT1: torch.Tensor) -> torch.Tensor:
    """(B, T) loss of predicting tokens[:, 1:] from what precedes them (fp32)."""
    logits_BTV = model(tokens_BT1[:, :-1])
    targets_BT = tokens_BT1[:, 1:]
    ce = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none")
    return ce.view_as(targets_BT)


@torch.no_grad()
def score_rows(model: MoETransformer, tokens_NT1: torch.Tensor, mask_NT1: torch.Tensor,
               byte_lengths_V: torch.Tensor, batch_size: int) -> LMScore:
    """Loss, token and byte counts over the positions whose target the mask marks."""
    if tokens_NT1.shape[1] - 1 > model.cfg.max_seq_len:
        raise ValueError(f"rows of {tokens_NT1.shape[1] - 1} tokens exceed the model's context "
                         f"max_seq_len={model.cfg.max_seq_len}.")
    nll, n_tok, n_bytes = 0.0, 0, 0
    for lo in range(0, tokens_NT1.shape[0], batch_size):
        tokens, mask = tokens_NT1[lo:lo + batch_size], mask_NT1[lo:lo + batch_size, 1:]
        ce_BT = token_nll(model, tokens)
        nll += float((ce_BT.double() * mask).sum())
        n_tok += int(mask.sum())
        n_bytes += int((byte_lengths_V[tokens[:, 1:]] * mask.long()).sum())
    return LMScore(nll, n_tok, n_bytes)


@torch.no_grad()
def continuation_logprobs(model: MoETransformer, pairs: list[tuple[list[int], list[int]]],
                          batch_size: int = 16) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids); contexts are
    cut from the left to fit the model's context."""
    out: list[float] = []
    max_len = model.cfg.max_seq_len + 1
    for lo in range(0, len(pairs), batch_size):
        rows, spans = [], []
        for ctx, cont in pairs[lo:lo + batch_size]:
            ids = (ctx + cont)[-max_len:]
            rows.append(ids)
            spans.append((len(ids) - len(cont), len(ids)))
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, :len(r)] = torch.tensor(r)
        ce_BT = token_nll(model, tokens)  # position t scores token t + 1
        out += [-float(ce_BT[b, start - 1:end - 1].double().sum()) for b, (start, end) in enumerate(spans)]
    return out
