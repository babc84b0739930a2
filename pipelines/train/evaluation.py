"""The training loss and the validation loss: next-token cross entropy under the loss mask, and
`Evaluator`, the mean validation loss over a fixed sample of the validation split (under pipeline
parallelism through the schedule's forward-only path)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from cluster.profiles import torch_dtype
from moe.loss import IGNORE_INDEX, token_loss_sum
from moe.model import MoETransformer
from moe.parallel.pipeline import Pipeline
from pipelines.data.ingest import SplitReader, index_split
from pipelines.train.collectives import all_reduce_
from pipelines.train.config import TrainConfig, global_batch_size


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on profiles that ask for it; fp32 (no autocast) otherwise."""
    dtype = torch_dtype(cfg.cluster)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


class Evaluator:
    """Mean validation loss over a fixed sample of the validation split, read once and kept, so every
    point of the validation curve measures the same sequences. The sample takes evenly spaced
    seq_ids across the whole split (not its first rows, which may all come from one document),
    `train.eval_batches` global batches of them whatever the world size, dealt out to the ranks by seq_id."""

    def __init__(self, cfg: TrainConfig, device: torch.device, n_val_sequences: int, dataset_dir: Path) -> None:
        self.cfg, self.device, self.n_val_sequences, self.dataset_dir = cfg, device, n_val_sequences, dataset_dir
        self._batches: list[dict[str, torch.Tensor]] | None = None

    def _load(self, data_rank: int, n_data: int) -> list[dict[str, torch.Tensor]]:
        b, g = self.cfg.train.micro_batch_size, global_batch_size(self.cfg)  # g: a multiple of n_data * b
        # whole batches on every data rank: under expert (and pipeline) parallelism each forward is a collective
        n_sample = min(self.n_val_sequences, self.cfg.train.eval_batches * g) // (n_data * b) * (n_data * b)
        chosen = torch.linspace(0, self.n_val_sequences - 1, n_sample).round().long().unique()
        mine = chosen[data_rank::n_data].numpy()  # by seq_id, so the shares never depend on read order
        reader = SplitReader(index_split(self.dataset_dir, "val"))
        return [reader.read(mine[i:i + b]) for i in range(0, len(mine) - b + 1, b)]

    @torch.no_grad()
    def __call__(self, model: MoETransformer, data_rank: int, n_data: int, pipeline: Pipeline | None = None
                 ) -> float:
        """Mean token loss over the sample. `data_rank` of `n_data` data-parallel ranks picks the share;
        the ranks of one pipeline read the same share and run it through the schedule's eval path."""
        if self._batches is None:
            self._batches = self._load(data_rank, n_data)
        model.eval()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for batch in self._batches:
            tokens, mask = batch["tokens"].to(self.device), batch["loss_mask"].to(self.device)
            targets = torch.where(mask[:, 1:] > 0, tokens[:, 1:], IGNORE_INDEX)
            with autocast(self.cfg, self.device):
                if pipeline is None:
                    ce = token_loss_sum(model(tokens[:, :-1]), targets)
                else:  # only the last stage has the loss; the others add zeros below
                    ce = pipeline.eval(tokens[:, :-1], targets, dtypes=(torch.float32, torch_dtype(self.cfg.cluster)))
            if ce is not None:
                loss_sum += torch.tensor([float(ce), float((targets != IGNORE_INDEX).sum())], dtype=torch.float64)
        model.train()
        all_reduce_(loss_sum)
        return float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
