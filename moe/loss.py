"""The language-model loss every training path uses (one process, data/expert parallel, pipeline
stages): the sum of next-token cross entropies over targets that are not `IGNORE_INDEX`. Callers
divide by the global count of valid targets, so the loss is a mean over the whole global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target masked out of the loss (loss_mask == 0)


def token_loss_sum(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross entropies (computed in fp32) over targets that are not IGNORE_INDEX."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
