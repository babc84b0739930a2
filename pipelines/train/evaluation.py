"""The training loss and the validation loss: next-token cross entropy under the loss mask, and
`Evaluator`, the mean validation loss over a fixed sample of the validation split."""

from __future__ import annotations

import contextlib

import ray.train
import torch
import torch.nn.functional as F

from cluster.profiles import torch_dtype
from moe.model import MoETransformer
from pipelines.data.ingest import ConsumedSet, iter_batches
from pipelines.train.collectives import all_reduce_
from pipelines.train.config import TrainConfig


def masked_lm_loss(logits_BTV: torch.Tensor, tokens_BT1: torch.Tensor, mask_BT1: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over positions whose target is marked in the loss mask."""
    targets_BT = tokens_BT1[:, 1:]
    mask_BT = mask_BT1[:, 1:].to(logits_BTV.dtype)
    ce_BT = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none")
    return (ce_BT.view_as(mask_BT) * mask_BT).sum() / mask_BT.sum().clamp(min=1)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on profiles that ask for it; fp32 (no autocast) otherwise."""
    dtype = torch_dtype(cfg.cluster)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


class Evaluator:
    """Mean validation loss over a fixed sample of the validation split, read once and kept, so every
    point of the validation curve measures the same sequences. The sample takes evenly spaced
    seq_ids across the whole split (not its first rows, which may all come from one document),
    dealt out to the ranks by seq_id."""

    def __init__(self, cfg: TrainConfig, device: torch.device, n_val_sequences: int) -> None:
        self.cfg, self.device, self.n_val_sequences = cfg, device, n_val_sequences
        self._batches: list[dict[str, torch.Tensor]] | None = None

    def _load(self, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
        b = self.cfg.train.micro_batch_size
        # whole batches on every rank: under expert parallelism each forward is a collective
        n_sample = min(self.n_val_sequences, self.cfg.train.eval_batches * world * b) // (world * b) * (world * b)
        chosen = torch.linspace(0, self.n_val_sequences - 1, n_sample).round().long().unique()
        keep = torch.zeros(self.n_val_sequences, dtype=torch.bool)
        keep[chosen[rank::world]] = True  # by seq_id, so the ranks' shares never depend on read order
        skip = ConsumedSet(self.n_val_sequences)  # everything outside this rank's share counts as "consumed"
        skip.add(torch.nonzero(~keep).flatten())
        return list(iter_batches(ray.train.get_dataset_shard("val"), b, skip))

    @torch.no_grad()
    def __call__(self, model: MoETransformer, rank: int, world: int) -> float:
        if self._batches is None:
            self._batches = self._load(rank, world)
        model.eval()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for batch in self._batches:
            tokens, mask = batch["tokens"].to(self.device), batch["loss_mask"].to(self.device)
            with autocast(self.cfg, self.device):
                logits = model(tokens[:, :-1])
            n = float(mask[:, 1:].sum())
            loss_sum += torch.tensor([float(masked_lm_loss(logits, tokens, mask)) * n, n], dtype=torch.float64)
        model.train()
        all_reduce_(loss_sum)
        return float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
