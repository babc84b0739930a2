"""The resolved training plan: what will run where, derived from the config alone (no Ray needed).

Printed at the start of every run and by `train.dry_run=true`.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.flops import flops_per_token, param_counts
from moe.parallel.mesh import ParallelDims
from pipelines.train.config import TrainConfig


@dataclass(frozen=True)
class TrainingPlan:
    profile: str
    workers: str
    device: str
    backend: str
    dtype: str
    dims: ParallelDims
    micro_batch_size: int
    global_batch: int
    tokens_per_step: int
    steps: int
    total_params: int
    active_params: int
    flops_per_token: float

    def lines(self) -> list[str]:
        d = self.dims
        return [
            f"profile        {self.profile}",
            f"workers        {self.workers}",
            f"device         {self.device} / backend {self.backend} / dtype {self.dtype}",
            f"mesh           dp={d.dp} ep={d.ep} pp={d.pp} (world {d.world_size})",
            f"batch          {self.micro_batch_size} seq/worker, global {self.global_batch} seq "
            f"= {self.tokens_per_step:,} tokens/step",
            f"steps          {self.steps} ({self.steps * self.tokens_per_step:,} tokens)",
            f"parameters     {self.total_params:,} total, {self.active_params:,} active per token",
            f"FLOPs/token    {self.flops_per_token:.3e} (train, fwd+bwd)",
        ]


def make_plan(cfg: TrainConfig) -> TrainingPlan:
    cl = cfg.cluster
    dims = ParallelDims.from_degrees(cl.num_workers, cfg.parallel.dp, cfg.parallel.ep, cfg.parallel.pp,
                                     cfg.model.moe.n_routed_experts)
    counts = param_counts(cfg.model)
    workers = f"{cl.num_workers}" if cl.min_workers is None else f"{cl.min_workers}..{cl.num_workers} (elastic)"
    res = f" x ({cl.cpus_per_worker:g} CPU" + (f", {cl.gpus_per_worker:g} GPU {cl.accelerator_type or ''}".rstrip()
                                              if cl.gpus_per_worker else "") + ")"
    global_batch = cfg.train.micro_batch_size * dims.dp
    return TrainingPlan(
        profile=cl.name, workers=workers + res, device=cl.device, backend=cl.backend, dtype=cl.dtype, dims=dims,
        micro_batch_size=cfg.train.micro_batch_size, global_batch=global_batch,
        tokens_per_step=global_batch * cfg.data.seq_len, steps=cfg.train.steps,
        total_params=counts.total, active_params=counts.active,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
    )
