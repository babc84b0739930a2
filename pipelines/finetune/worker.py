"""The fine-tuning worker: `FinetuneTrainer`, the training `Trainer` with three of its steps replaced.

    build_model   meta -> parallelize -> materialize as in training, then the frozen base weights
                  from the exported model (each rank reads only its shards), then the LoRA adapters
                  (pipelines/finetune/model.py)
    checkpoints   adapters (and their optimizer state) only, resharding like training checkpoints,
                  in the training's `CheckpointStore`
    next_batches  with privacy on: a Poisson sample of this data rank's share of the train split
    train_step    (read once at setup through the ingest's `index_split`/`SplitReader`), and DP-SGD
                  over it (`dp_sgd_step`, pipelines/finetune/privacy.py): exact per-example adapter
                  gradients, epsilon per step; the sampled examples are not put in the sample ledger
Everything else (the global data order and its ledger without privacy, gradient sync of the trainable
parameters only, clipping, the schedule, evaluation, reporting, resume) is the training loop's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint
from moe.lora import trainable_fraction_line
from moe.parallel.mesh import ParallelDims
from pipelines.finetune.config import FinetuneConfig
from pipelines.finetune.model import build_finetune_model
from pipelines.finetune.privacy import dp_sgd_step, make_accountant, poisson_sample, secret_generator
from pipelines.train.collectives import all_reduce_
from pipelines.train.worker import StepStats, Trainer


class FinetuneTrainer(Trainer):
    """The training `Trainer` on a frozen base with LoRA adapters; `base_dir` is the exported base model."""

    def __init__(self, cfg: FinetuneConfig, dataset_dir: Path, checkpoint_dir: Path, n_val_sequences: int,
                 base_dir: Path) -> None:
        super().__init__(cfg, dataset_dir, checkpoint_dir, n_val_sequences)
        self.base_dir = Path(base_dir)
        self.accountant = make_accountant(cfg.privacy.accountant) if cfg.privacy.enabled else None
        self.spent_epsilon: float | None = None  # after the last DP step

    def build_model(self, dims: ParallelDims) -> None:
        cfg: FinetuneConfig = self.cfg
        self.model, self.plan = build_finetune_model(cfg, dims, self.device, self.base_dir)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.rank == 0:
            print(f"[finetune] {trainable_fraction_line(self.model, cfg.lora)[1]}", flush=True)

    def write_checkpoint(self, directory: Path, extra: dict[str, Any]) -> None:
        if self.accountant is not None:
            extra["accountant"] = self.accountant.history
        save_adapter_checkpoint(self.model, self.opt, directory, extra, self.rank)

    def read_checkpoint(self, directory: Path) -> dict[str, Any]:
        extra = load_adapter_checkpoint(self.model, self.opt, directory)
        if self.accountant is not None:
            self.accountant.history = list(extra.get("accountant", []))
        return extra

    # ---- DP-SGD -----------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        if self.accountant is None:
            return
        n = self.order.n_sequences  # this data rank's share: every D-th example (D data ranks), none dropped
        self.pool = self.reader.read(np.arange(self.data_rank, n, self.dims.data_ranks))
        self.sample_rate = self.cfg.privacy.expected_batch_size / n
        self.generator = secret_generator()

    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        """Without privacy the training's micro-batches; with it one Poisson sample of this rank's pool."""
        if self.accountant is None:
            return super().next_batches()
        idx = poisson_sample(len(self.pool["tokens"]), self.sample_rate, self.generator)
        return [{key: rows[idx] for key, rows in self.pool.items()}]

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepStats:
        if self.accountant is None:
            return super().train_step(batches)
        (batch,) = batches
        loss_sum, grad_norm, self.spent_epsilon = dp_sgd_step(
            self.model, self.trainable, self.opt, self.sched, batch, self.cfg.privacy, self.accountant,
            self.sample_rate, self.state.step + 1, self.cfg.train.micro_batch_size, self.device, self.rank,
            self.generator if self.rank == 0 else None)
        self.plan.reduce_expert_loads()  # keep the counters (and the collective) as in training
        totals = all_reduce_(torch.tensor([loss_sum, float(len(batch["tokens"]))], dtype=torch.float64))
        self.state.step += 1
        tokens = int(totals[1]) * self.cfg.data.seq_len
        self.state.tokens_seen += tokens
        return StepStats(loss=float(totals[0] / totals[1].clamp(min=1)), aux_loss=0.0, z_loss=0.0,
                         grad_norm=grad_norm, tokens=tokens, loads={})

    def epsilon(self) -> float:
        """The epsilon spent so far: the last step's (the accountant's computation is the DP step's costliest
        part, so it is done once per step); after a resume, before a step, from the restored history."""
        if self.spent_epsilon is not None:
            return self.spent_epsilon
        return float(self.accountant.get_epsilon(self.cfg.privacy.delta)) if self.accountant.history else 0.0

    def log(self, window: Any, last: StepStats, eta_s: float) -> dict[str, Any]:
        metrics = super().log(window, last, eta_s)
        if self.accountant is not None:
            metrics["privacy/epsilon"] = self.epsilon()
        return metrics


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on every worker."""
    FinetuneTrainer(config["cfg"], Path(config["dataset_dir"]), Path(config["checkpoint_dir"]),
                    config["n_val_sequences"], Path(config["base_dir"])).fit()

