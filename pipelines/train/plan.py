"""The resolved training plan: what will run where, derived from the config alone (no Ray needed).

Printed at the start of every run and by `train.dry_run=true`. The memory lines come from the
model itself: it is built on the meta device and sharded exactly as a training rank shards it
(`moe.parallel.apply.shard_model`, pipeline stages included: the plan shows the largest stage), so
they count what one rank will hold, before any GPU is rented (tensor-parallel weights divided by tp).
The global batch counts data-parallel ranks only (dp x ep; the pp ranks of a pipeline and the tp
ranks of a group train the same sequences). The planner's lines (pipelines/train/planner.py) add
activations, communication buffers, the peak against the profile's memory and the expected step
time; a layout that does not fit is a ConfigError naming the largest term and the knob that fixes it.
With `parallel=auto` the plan also says why the planner chose the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig
from moe.flops import flops_per_token, param_counts
from moe.model import build_meta_model
from moe.parallel.apply import shard_model
from moe.parallel.mesh import ParallelDims
from moe.parallel.pipeline import PipelineConfig, split_stages
from moe.parallel.tensor import block_plan
from pipelines.train.config import TrainConfig, global_batch_size, layout_at, pipeline_config, planner_inputs
from pipelines.train.planner import Estimate, check_fits, choose_layout, describe, estimate

GIB = 1024 ** 3
MASTER_BYTES = 4  # parameters and gradients are fp32 (bf16 profiles compute under autocast)
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32, per trainable element


@dataclass(frozen=True)
class RankMemory:
    """What one training rank holds for the model: parameters, gradients, optimizer state (bytes)."""

    params: int  # parameter elements on the rank (its expert shard plus everything replicated)
    param_bytes: int
    grad_bytes: int
    optim_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes


def rank_memory(model_cfg: ModelConfig, dims: ParallelDims, rank: int = 0,
                pipeline: PipelineConfig | None = None) -> RankMemory:
    """Build the model on meta, keep `rank`'s share (`shard_model`: its pipeline stages, then its
    experts) and count it. Every rank of a stage holds the same amount (the experts divide evenly
    over ep), so the stage's first rank stands for all of them."""
    model = build_meta_model(model_cfg)
    shard_model(model, dims, rank, pipeline)
    split = {f"layers.{n}.{m}.weight" for n, b in model.layers.items() for m in block_plan(b)} if dims.tp > 1 else set()
    sizes = {n: p.numel() // (dims.tp if n in split else 1) for n, p in model.named_parameters()}
    params = sum(sizes.values())
    trainable = sum(sizes[n] for n, p in model.named_parameters() if p.requires_grad)
    return RankMemory(params=params, param_bytes=params * MASTER_BYTES, grad_bytes=trainable * MASTER_BYTES,
                      optim_bytes=trainable * ADAMW_STATES * MASTER_BYTES)


def largest_stage_memory(model_cfg: ModelConfig, dims: ParallelDims, pipeline: PipelineConfig | None = None
                         ) -> RankMemory:
    """The rank that holds the most: one rank per pipeline rank (stage), the largest kept."""
    stage_first_ranks = [p * dims.dp * dims.ep * dims.tp for p in range(dims.pp)]
    return max((rank_memory(model_cfg, dims, r, pipeline) for r in stage_first_ranks), key=lambda m: m.total_bytes)


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
    memory: RankMemory
    pipeline_line: str = ""
    estimate: Estimate | None = None
    auto_lines: tuple[str, ...] = ()
    recompute: str = "none"

    def lines(self) -> list[str]:
        d = self.dims
        return [
            f"profile        {self.profile}",
            f"workers        {self.workers}",
            f"device         {self.device} / backend {self.backend} / dtype {self.dtype}",
            f"mesh           dp={d.dp} tp={d.tp} ep={d.ep} pp={d.pp} (world {d.world_size}){self.pipeline_line}",
            *self.auto_lines,
            f"batch          {self.micro_batch_size} seq/data-parallel rank, global {self.global_batch} seq "
            f"= {self.tokens_per_step:,} tokens/step",
            f"steps          {self.steps} ({self.steps * self.tokens_per_step:,} tokens)",
            f"parameters     {self.total_params:,} total, {self.active_params:,} active per token",
            f"FLOPs/token    {self.flops_per_token:.3e} (train, fwd+bwd)",
            f"per rank       {'(largest stage) ' if d.pp > 1 else ''}{self.memory.params:,} parameters: {self.memory.param_bytes / GIB:.2f} GiB params + "
            f"{self.memory.grad_bytes / GIB:.2f} GiB grads + {self.memory.optim_bytes / GIB:.2f} GiB AdamW "
            f"= {self.memory.total_bytes / GIB:.2f} GiB (fp32; activations not included)",
            f"recompute      train.activation_checkpointing={self.recompute}",
            *(describe(self.estimate) if self.estimate else []),
        ]


def make_plan(cfg: TrainConfig) -> TrainingPlan:
    cl = cfg.cluster
    dims = ParallelDims.from_degrees(cl.num_workers, cfg.parallel.dp, cfg.parallel.ep, cfg.parallel.pp,
                                     cfg.model.moe.n_routed_experts, tp=cfg.parallel.tp)
    workload, layout = planner_inputs(cfg)
    est = estimate(workload, layout, cl)
    check_fits(est, workload, cl)  # ConfigError naming the largest term and the knob that fixes it
    auto_lines = tuple(choose_layout(workload, cl, cl.num_workers, layout)[1]) if cfg.parallel.auto else ()
    counts = param_counts(cfg.model)
    workers = f"{cl.num_workers}" if cl.min_workers is None else f"{cl.min_workers}..{cl.num_workers} (elastic: " + \
        ", ".join(f"{w} -> dp={d.dp} ep={d.ep} pp={d.pp} tp={d.tp} x{a} accumulation" for w in range(cl.min_workers, cl.num_workers + 1)
                  for d, a in [(layout_at(cfg, w).dims, layout_at(cfg, w).accumulation)]) + ")"
    res = f" x ({cl.cpus_per_worker:g} CPU" + (f", {cl.gpus_per_worker:g} GPU {cl.accelerator_type or ''}".rstrip()
                                              if cl.gpus_per_worker else "") + ")"
    global_batch = global_batch_size(cfg)  # the same at every world size (gradient accumulation, layout.py)
    pipeline = pipeline_config(cfg.parallel)
    stages = split_stages(cfg.model, pipeline.n_stages(dims.pp)) if dims.pp > 1 else []
    pipeline_line = (f"; {pipeline.schedule}, {pipeline.microbatches} microbatches, stages (layers) "
                     + " | ".join(",".join(map(str, s.layer_ids)) for s in stages)) if stages else ""
    return TrainingPlan(
        profile=cl.name, workers=workers + res, device=cl.device, backend=cl.backend, dtype=cl.dtype, dims=dims,
        micro_batch_size=cfg.train.micro_batch_size, global_batch=global_batch,
        tokens_per_step=global_batch * cfg.data.seq_len, steps=cfg.train.steps,
        total_params=counts.total, active_params=counts.active,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
        memory=largest_stage_memory(cfg.model, dims, pipeline), pipeline_line=pipeline_line,
        estimate=est, auto_lines=auto_lines, recompute=cfg.train.activation_checkpointing,
    )
