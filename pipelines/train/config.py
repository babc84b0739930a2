"""Typed configs of a training run (`conf/train.yaml` and its groups), their cross-field checks
(`validate_train_config`: every message names the key, the value and the fix) and Hydra
registration. The model schema is `moe.config.ModelConfig`, the cluster schema
`cluster.config.ClusterConfig`, the corpus `pipelines.data.config.DataConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from cluster.config import ClusterConfig, validate_monitoring
from moe.config import ModelConfig
from moe.parallel.pipeline import PipelineConfig
from moe.parallel.tensor import check_tensor_parallel
from pipelines.core.config import check, compose_config, to_dataclass
from pipelines.core.tracking import TrackingConfig
from pipelines.data.config import DataConfig
from pipelines.train.layout import Degrees, WorldLayout, check_elastic_range, default_global_batch, layout_for
from pipelines.train.planner import RECOMPUTE, Layout, Workload, choose_layout


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    grad_clip: float = 1.0


@dataclass
class ParallelConfig:
    """Degrees of the device mesh; dp=-1 takes what is left of the world. With pp > 1 the model is
    split into pipeline stages run by `pp_schedule` over `pp_microbatches` microbatches of each
    pipeline's `train.micro_batch_size` sequences (moe/parallel/pipeline.py). The tp ranks of a group
    read the same sequences (moe/parallel/tensor.py). `auto=true` replaces the degrees with the
    planner's choice (pipelines/train/planner.py) when the config is validated."""

    dp: int = -1
    ep: int = 1
    pp: int = 1
    tp: int = 1  # tensor parallelism inside a node: attention heads and dense/shared feed-forward split
    auto: bool = False  # parallel=auto: the planner picks dp, tp, pp, ep (and pp_microbatches) for the world
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    pp_microbatches: int = 2
    pp_virtual_stages: int = 1  # stages per rank (interleaved_1f1b: >= 2)
    pp_timeout_s: float = 600.0  # pipeline send/recv and process-group timeout


def pipeline_config(p: ParallelConfig) -> PipelineConfig:
    return PipelineConfig(schedule=p.pp_schedule, microbatches=p.pp_microbatches,
                          virtual_stages=p.pp_virtual_stages, timeout_s=p.pp_timeout_s)


def degrees(p: ParallelConfig) -> Degrees:
    return Degrees(dp=p.dp, ep=p.ep, pp=p.pp, tp=p.tp)


def global_batch_size(c: TrainConfig) -> int:
    """`train.global_batch_size`, or one micro-batch per data-parallel rank at `cluster.num_workers`."""
    return c.train.global_batch_size or default_global_batch(
        degrees(c.parallel), c.model.moe.n_routed_experts, c.model.n_layers, pipeline_config(c.parallel),
        c.train.micro_batch_size, c.cluster.num_workers)


def layout_at(c: TrainConfig, world: int) -> WorldLayout:
    """The parallel layout and accumulation of `world` workers (pipelines/train/layout.py)."""
    return layout_for(world, degrees(c.parallel), c.model.moe.n_routed_experts, c.model.n_layers,
                      pipeline_config(c.parallel), c.train.micro_batch_size, global_batch_size(c),
                      c.cluster.num_workers)


@dataclass
class TrainLoopConfig:
    steps: int = 200
    micro_batch_size: int = 16  # sequences per data-parallel rank (a whole pipeline under pp) per micro-step
    global_batch_size: int | None = None  # sequences per optimizer step at every world size (None: micro x dp*ep
    # at cluster.num_workers); fewer data-parallel ranks make it up with gradient accumulation (layout.py)
    shuffle_window: int = 8  # Parquet row groups shuffled together; the order is a function of seed and epoch
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4  # global batches of validation sequences (the same sample at every world size)
    checkpoint_every: int = 50
    seed: int = 0
    dry_run: bool = False
    max_failures: int = 2
    keep_checkpoints: int = 3  # the last K committed checkpoints are kept (older ones deleted)
    resume: str | None = None  # "latest" or an MLflow run id: continue that run from its latest good checkpoint
    storage_path: str = "outputs/ray_results"
    num_threads: int = 0  # torch intra-op threads per worker; 0: cpus_per_worker
    activation_checkpointing: str = "none"  # none | moe | full (moe/parallel/recompute.py)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)


def compose_train_config(overrides: list[str] | None = None) -> TrainConfig:
    """conf/train.yaml with overrides -> validated `TrainConfig` (library callers, cluster.submit)."""
    register_configs()
    return to_train_config(compose_config("train", overrides))


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Composed Hydra config -> validated `TrainConfig` (raises ConfigError naming the key and fix)."""
    return validate_train_config(to_dataclass(cfg, TrainConfig, "train_schema"))


def validate_train_config(c: TrainConfig) -> TrainConfig:
    c.model.validate(seq_len=c.data.seq_len)
    validate_monitoring(c.cluster.monitoring, "cluster.monitoring")
    check(c.model.vocab_size >= c.data.vocab_size,
           f"model.vocab_size={c.model.vocab_size} is smaller than data.vocab_size={c.data.vocab_size}; "
           f"set model.vocab_size>={c.data.vocab_size} or lower data.vocab_size.")
    check(c.data.seq_len > 0, f"data.seq_len={c.data.seq_len} must be positive.")
    t, o, cl, p = c.train, c.optim, c.cluster, c.parallel
    for key, value in (("train.steps", t.steps), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
                       ("train.checkpoint_every", t.checkpoint_every), ("cluster.num_workers", cl.num_workers)):
        check(value > 0, f"{key}={value} must be positive.")
    check(o.lr > 0, f"optim.lr={o.lr} must be positive.")
    check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be within [0, 1].")
    check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
    check(cl.vendor in ("cpu", "nvidia", "amd"), f"cluster.vendor={cl.vendor!r}: use cpu, nvidia or amd.")
    check(cl.device in ("cpu", "cuda"), f"cluster.device={cl.device!r}: use cpu or cuda (ROCm also uses cuda).")
    check(cl.backend in ("gloo", "nccl"), f"cluster.backend={cl.backend!r}: use gloo (CPU) or nccl (NCCL/RCCL).")
    check(cl.dtype in ("float32", "bfloat16"), f"cluster.dtype={cl.dtype!r}: use float32 or bfloat16.")
    check(not (cl.device == "cpu" and cl.backend == "nccl"),
           "cluster.backend=nccl needs cluster.device=cuda; use backend=gloo on CPU.")
    if cl.min_workers is not None:
        check(0 < cl.min_workers <= cl.num_workers,
               f"cluster.min_workers={cl.min_workers} must be within [1, cluster.num_workers={cl.num_workers}].")
    check(t.activation_checkpointing in RECOMPUTE, f"train.activation_checkpointing={t.activation_checkpointing!r}: "
          f"use one of {', '.join(RECOMPUTE)}.")
    if p.auto:
        _resolve_auto(c)
    for key, value in (("parallel.ep", p.ep), ("parallel.pp", p.pp), ("parallel.tp", p.tp)):
        check(value >= 1, f"{key}={value} must be >= 1.")
    check_tensor_parallel(c.model, p.tp)
    check(t.micro_batch_size % p.pp == 0,
          f"train.micro_batch_size={t.micro_batch_size} is not divisible by parallel.pp={p.pp}: a pipeline splits "
          f"its micro-batch between its stages' microbatches; choose a multiple of {p.pp}.")
    check(p.dp == -1 or p.dp >= 1, f"parallel.dp={p.dp} must be >= 1, or -1 for 'the rest of the world'.")
    check(c.model.moe.n_routed_experts % p.ep == 0,
           f"model.moe.n_routed_experts={c.model.moe.n_routed_experts} is not divisible by parallel.ep={p.ep}; "
           "choose an ep that divides the number of experts.")
    _validate_pipeline(c)
    _validate_elastic(c)
    return c


def _validate_elastic(c: TrainConfig) -> None:
    """Every world size in [min_workers, num_workers] has a layout that makes up the global batch."""
    t, cl = c.train, c.cluster
    check(t.global_batch_size is None or t.global_batch_size > 0,
          f"train.global_batch_size={t.global_batch_size} must be positive (or null for micro x data ranks).")
    check(t.shuffle_window > 0, f"train.shuffle_window={t.shuffle_window} must be >= 1 (row groups).")
    check(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1.")
    check(cl.resize_check_interval_s >= 0,
          f"cluster.resize_check_interval_s={cl.resize_check_interval_s} must be >= 0 (seconds).")
    check(cl.worker_start_timeout_s > 0,
          f"cluster.worker_start_timeout_s={cl.worker_start_timeout_s} must be positive (seconds).")
    check_elastic_range(cl.min_workers or cl.num_workers, cl.num_workers, degrees(c.parallel),
                        c.model.moe.n_routed_experts, c.model.n_layers, pipeline_config(c.parallel),
                        t.micro_batch_size, global_batch_size(c))


def planner_inputs(c: TrainConfig) -> tuple[Workload, Layout]:
    """What the planner needs of a config: the work per step and the layout (dp=-1 resolved)."""
    p = c.parallel
    dp = p.dp if p.dp != -1 else max(1, c.cluster.num_workers // (p.tp * p.pp * p.ep))
    return (Workload(c.model, c.data.seq_len, c.train.micro_batch_size, c.train.activation_checkpointing),
            Layout(dp=dp, tp=p.tp, pp=p.pp, ep=p.ep, microbatches=p.pp_microbatches,
                   virtual_stages=p.pp_virtual_stages, schedule=p.pp_schedule))


def _resolve_auto(c: TrainConfig) -> None:
    """parallel=auto: the planner's layout for cluster.num_workers replaces the configured degrees."""
    workload, base = planner_inputs(c)
    layout, _ = choose_layout(workload, c.cluster, c.cluster.num_workers, base)
    p = c.parallel
    p.dp, p.tp, p.pp, p.ep = layout.dp, layout.tp, layout.pp, layout.ep
    p.pp_microbatches, p.pp_virtual_stages, p.pp_schedule = layout.microbatches, layout.virtual_stages, layout.schedule


def _validate_pipeline(c: TrainConfig) -> None:
    """pp > 1: the schedule can run the layout, and a pipeline's batch splits into its microbatches."""
    p, b = c.parallel, c.train.micro_batch_size
    pipeline_config(p).validate(p.pp, c.model.n_layers)  # ConfigError naming the key and the fix
    if p.pp == 1:
        return
    check(c.cluster.num_workers % p.pp == 0,
          f"parallel.pp={p.pp} does not divide cluster.num_workers={c.cluster.num_workers}; "
          f"set cluster.num_workers to a multiple of {p.pp * p.ep * p.tp}.")
    check(b % p.pp_microbatches == 0,
          f"train.micro_batch_size={b} (sequences per pipeline per step) is not divisible by "
          f"parallel.pp_microbatches={p.pp_microbatches}; choose a multiple of it.")
    check(b % p.pp == 0,
          f"train.micro_batch_size={b} is not divisible by parallel.pp={p.pp}: each of a pipeline's {p.pp} ranks "
          f"reads 1/{p.pp} of its batch; choose a multiple of {p.pp}.")
