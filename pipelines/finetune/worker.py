"""The fine-tuning worker: `FinetuneTrainer`, the training `Trainer` with three of its steps replaced.

    build_model   meta -> parallelize -> materialize as in training, then the frozen base weights
                  from the exported model (each rank reads only its shards), then the LoRA adapters
    checkpoints   adapters (and their optimizer state) only, resharding like training checkpoints,
                  in the training's `CheckpointStore`
    next_batches  with privacy on: a Poisson sample of this data rank's share of the train split
    train_step    (read once at setup through the ingest's `index_split`/`SplitReader`), and DP-SGD
                  over it (pipelines/finetune/privacy.py): exact per-example adapter gradients,
                  epsilon per step; the sampled examples are not put in the sample ledger
Everything else (the global data order and its ledger without privacy, gradient sync of the trainable
parameters only, clipping, the schedule, evaluation, reporting, resume) is the training loop's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe.checkpoint import load_adapter_checkpoint, load_exported_weights, save_adapter_checkpoint
from moe.lora import apply_lora, capture_per_example, shard_adapter_gradients, trainable_fraction_line
from moe.loss import IGNORE_INDEX
from moe.model import build_meta_model, materialize
from moe.parallel.apply import parallelize
from moe.parallel.mesh import ParallelDims
from pipelines.finetune.config import FinetuneConfig
from pipelines.finetune.privacy import (
    PrivacyBudgetError,
    clip_into,
    make_accountant,
    noisy_mean,
    poisson_sample,
    secret_generator,
)
from pipelines.train.collectives import all_reduce_
from pipelines.train.config import pipeline_config
from pipelines.train.worker import StepStats, Trainer


class FinetuneTrainer(Trainer):
    """The training `Trainer` on a frozen base with LoRA adapters; `base_dir` is the exported base model."""

    def __init__(self, cfg: FinetuneConfig, dataset_dir: Path, checkpoint_dir: Path, n_val_sequences: int,
                 base_dir: Path) -> None:
        super().__init__(cfg, dataset_dir, checkpoint_dir, n_val_sequences)
        self.base_dir = Path(base_dir)
        self.accountant = make_accountant(cfg.privacy.accountant) if cfg.privacy.enabled else None

    def build_model(self, dims: ParallelDims) -> None:
        cfg: FinetuneConfig = self.cfg
        self.model = build_meta_model(cfg.model)
        self.plan = parallelize(self.model, dims, device_type=self.device.type, pipeline=pipeline_config(cfg.parallel),
                                activation_checkpointing=cfg.train.activation_checkpointing)
        materialize(self.model, self.device, seed=cfg.train.seed)
        load_exported_weights(self.model, self.base_dir)
        apply_lora(self.model, cfg.lora, seed=cfg.train.seed)
        shard_adapter_gradients(self.plan)
        if not cfg.balance.update_expert_bias:  # the base's bias keeps routing as in the base, unchanged
            self.plan.update_expert_bias = lambda loads: None
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
        p, (batch,) = self.cfg.privacy, batches
        sigma = float(p.noise_multiplier)
        self.accountant.step(noise_multiplier=sigma, sample_rate=self.sample_rate)
        if self.epsilon() > p.target_epsilon * 1.0001:
            raise PrivacyBudgetError(f"step {self.state.step + 1} would spend epsilon {self.epsilon():.3f}, over "
                                     f"privacy.target_epsilon={p.target_epsilon}; the run stops here.")
        sums = [torch.zeros_like(t) for t in self.trainable]
        loss_sum = self._private_backward(batch, sums)
        noisy_mean(self.trainable, sums, sigma * p.max_grad_norm, p.expected_batch_size, self.rank,
                   self.generator if self.rank == 0 else None)
        grad_norm = torch.sqrt(sum(t.grad.pow(2).sum() for t in self.trainable))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.plan.reduce_expert_loads()  # keep the counters (and the collective) as in training
        totals = all_reduce_(torch.tensor([loss_sum, float(len(batch["tokens"]))], dtype=torch.float64))
        self.state.step += 1
        tokens = int(totals[1]) * self.cfg.data.seq_len
        self.state.tokens_seen += tokens
        return StepStats(loss=float(totals[0] / totals[1].clamp(min=1)), aux_loss=0.0, z_loss=0.0,
                         grad_norm=float(grad_norm), tokens=tokens, loads={})

    def _private_backward(self, batch: dict[str, torch.Tensor], sums: list[torch.Tensor]) -> float:
        """Per-example gradients of each example's mean token loss, clipped into `sums`, chunk by chunk."""
        loss_sum, b = 0.0, self.cfg.train.micro_batch_size
        for lo in range(0, len(batch["tokens"]), b):
            tokens = batch["tokens"][lo:lo + b].to(self.device)
            mask = batch["loss_mask"][lo:lo + b].to(self.device)
            targets = torch.where(mask[:, 1:] > 0, tokens[:, 1:], IGNORE_INDEX)
            with capture_per_example(len(tokens), targets.shape[1]):
                logits = self.model(tokens[:, :-1])
                ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                       ignore_index=IGNORE_INDEX, reduction="none")
                per_example = ce.view(len(tokens), -1).sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)
                per_example.sum().backward()
            clip_into(self.trainable, sums, self.cfg.privacy.max_grad_norm)
            for t in self.trainable:
                t.grad = None
            loss_sum += float(per_example.detach().sum())
        return loss_sum

    def epsilon(self) -> float:
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

