"""One rank's fine-tuned model: meta -> parallelize -> materialize as in training, then the frozen
base weights (each rank reads only its shards of the exported base), then the LoRA adapters. The
Ray Train worker (pipelines/finetune/worker.py) and the in-process canary measurement
(pipelines/finetune/canary.py) build it here."""

from __future__ import annotations

from pathlib import Path

import torch

from moe.checkpoint import load_exported_weights
from moe.lora import apply_lora, shard_adapter_gradients
from moe.model import MoETransformer, build_meta_model, materialize
from moe.parallel.apply import ParallelPlan, parallelize
from moe.parallel.mesh import ParallelDims
from pipelines.finetune.config import FinetuneConfig
from pipelines.train.config import pipeline_config


def build_finetune_model(cfg: FinetuneConfig, dims: ParallelDims, device: torch.device,
                         base_dir: Path | None) -> tuple[MoETransformer, ParallelPlan]:
    """(model, plan) of this rank. `base_dir`: the exported base model (None: the base stays at its
    seeded initialization, `train.seed`). Unless `balance.update_expert_bias`, the plan's bias
    update is off, so the base's expert bias keeps routing as in the base."""
    model = build_meta_model(cfg.model)
    plan = parallelize(model, dims, device_type=device.type, pipeline=pipeline_config(cfg.parallel),
                       activation_checkpointing=cfg.train.activation_checkpointing)
    materialize(model, device, seed=cfg.train.seed)
    if base_dir is not None:
        load_exported_weights(model, base_dir)
    apply_lora(model, cfg.lora, seed=cfg.train.seed)
    shard_adapter_gradients(plan)
    if not cfg.balance.update_expert_bias:
        plan.update_expert_bias = lambda loads: None
    return model, plan
