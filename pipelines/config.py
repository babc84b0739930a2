"""Hydra structured configs: typed dataclasses registered in Hydra's ConfigStore.

Every `conf/*.yaml` is validated against these schemas, so an unknown key or a wrong type fails
at composition. `to_train_config` turns the composed DictConfig into the dataclass tree that
library code receives and runs the cross-field checks (`validate_train_config`) that name the
key and the fix, all before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe.config import ConfigError, ModelConfig


@dataclass
class SourceConfig:
    """One input: the default corpus, text files, JSONL or Parquet; mixed by `weight`."""

    kind: str = "stdlib"  # stdlib | text | jsonl | parquet
    path: str | None = None  # file, directory or glob (unused for stdlib)
    field: str = "text"  # JSONL field / Parquet column holding the document
    weight: float = 1.0


@dataclass
class DataConfig:
    """The corpus and its packed form; shared by preprocessing and training."""

    name: str = "stdlib"
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    output_dir: str = "data/processed"  # root of versioned preprocess outputs
    version: str = "latest"  # which output training reads: "latest" or a version id
    seq_len: int = 256  # tokens per training sequence (packing length)
    vocab_size: int = 8192  # tokenizer vocabulary
    val_fraction: float = 0.02


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
    """Degrees of the device mesh; dp=-1 takes what is left of the world."""

    dp: int = -1
    ep: int = 1
    pp: int = 1


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "elastic-moe"
    run_name: str | None = None
    registered_model: str = "elastic-moe"


@dataclass
class ClusterConfig:
    """Where training runs: local CPU Ray or a GPU cluster profile (conf/cluster/)."""

    name: str = "local"
    vendor: str = "cpu"  # cpu | nvidia | amd
    address: str | None = None  # None: start a local Ray (unless RAY_ADDRESS is set); "auto" or ray://...
    num_workers: int = 2
    min_workers: int | None = None  # set for elastic training: ScalingConfig(num_workers=(min, max))
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    accelerator_type: str | None = None  # Ray accelerator type, e.g. A100, H100, AMD-Instinct-MI300X
    device: str = "cpu"  # cpu | cuda (ROCm builds of torch also use "cuda")
    backend: str = "gloo"  # gloo | nccl (RCCL on ROCm)
    dtype: str = "float32"  # float32 | bfloat16
    peak_tflops: float = 0.0  # dense bf16 peak per device; 0: measure a matmul peak at start (CPU)
    gpu_memory_gb: float = 0.0
    gpus_per_node: int = 0  # GPUs per Kubernetes node (KubeRay worker pod)
    node_cpus: int = 0  # CPUs per KubeRay worker pod; 0: cpus_per_worker * workers per pod
    node_memory_gb: int = 0  # memory per KubeRay worker pod; 0: 8 GiB per worker
    env: dict[str, str] = field(default_factory=dict)  # runtime env vars (NCCL_*, RCCL_*, ...)
    image: str = "rayproject/ray:2.60.0-py311-cpu"
    namespace: str = "default"


@dataclass
class TrainLoopConfig:
    steps: int = 200
    micro_batch_size: int = 16  # sequences per worker per step
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4  # per worker; the validation set is the first eval_batches * workers batches
    checkpoint_every: int = 50
    seed: int = 0
    dry_run: bool = False
    max_failures: int = 2
    storage_path: str = "outputs/ray_results"
    num_threads: int = 0  # torch intra-op threads per worker; 0: cpus_per_worker


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


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Composed Hydra config -> validated `TrainConfig` (raises ConfigError naming the key and fix)."""
    obj: Any = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):
        raise ConfigError("the train config did not compose against its schema (train_schema).")
    return validate_train_config(obj)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_train_config(c: TrainConfig) -> TrainConfig:
    c.model.validate(seq_len=c.data.seq_len)
    _check(c.model.vocab_size >= c.data.vocab_size,
           f"model.vocab_size={c.model.vocab_size} is smaller than data.vocab_size={c.data.vocab_size}; "
           f"set model.vocab_size>={c.data.vocab_size} or lower data.vocab_size.")
    _check(c.data.seq_len > 0, f"data.seq_len={c.data.seq_len} must be positive.")
    t, o, cl, p = c.train, c.optim, c.cluster, c.parallel
    for key, value in (("train.steps", t.steps), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
                       ("train.checkpoint_every", t.checkpoint_every), ("cluster.num_workers", cl.num_workers)):
        _check(value > 0, f"{key}={value} must be positive.")
    _check(o.lr > 0, f"optim.lr={o.lr} must be positive.")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be within [0, 1].")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
    _check(cl.vendor in ("cpu", "nvidia", "amd"), f"cluster.vendor={cl.vendor!r}: use cpu, nvidia or amd.")
    _check(cl.device in ("cpu", "cuda"), f"cluster.device={cl.device!r}: use cpu or cuda (ROCm also uses cuda).")
    _check(cl.backend in ("gloo", "nccl"), f"cluster.backend={cl.backend!r}: use gloo (CPU) or nccl (NCCL/RCCL).")
    _check(cl.dtype in ("float32", "bfloat16"), f"cluster.dtype={cl.dtype!r}: use float32 or bfloat16.")
    _check(not (cl.device == "cpu" and cl.backend == "nccl"),
           "cluster.backend=nccl needs cluster.device=cuda; use backend=gloo on CPU.")
    if cl.min_workers is not None:
        _check(0 < cl.min_workers <= cl.num_workers,
               f"cluster.min_workers={cl.min_workers} must be within [1, cluster.num_workers={cl.num_workers}].")
    for key, value in (("parallel.ep", p.ep), ("parallel.pp", p.pp)):
        _check(value >= 1, f"{key}={value} must be >= 1.")
    _check(p.dp == -1 or p.dp >= 1, f"parallel.dp={p.dp} must be >= 1, or -1 for 'the rest of the world'.")
    _check(c.model.moe.n_routed_experts % p.ep == 0,
           f"model.moe.n_routed_experts={c.model.moe.n_routed_experts} is not divisible by parallel.ep={p.ep}; "
           "choose an ep that divides the number of experts.")
    return c
