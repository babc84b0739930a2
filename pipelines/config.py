"""Hydra structured configs: typed dataclasses registered in Hydra's ConfigStore.

Every `conf/*.yaml` is validated against these schemas, so an unknown key or a wrong type fails
at composition. `to_train_config` turns the composed DictConfig into the dataclass tree that
library code receives and runs the cross-field checks (`validate_train_config`) that name the
key and the fix, all before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe.config import ConfigError, ModelConfig


@dataclass
class SourceConfig:
    """One input: the default corpus, text files, JSONL or Parquet; mixed by `weight`."""

    kind: str = "stdlib"  # stdlib | text | jsonl | parquet
    path: str | None = None  # file, directory or glob (unused for stdlib)
    field: str = "text"  # JSONL field / Parquet column holding the document
    weight: float = 1.0  # train-split mixing weight: 2.0 repeats each document twice, 0.5 keeps half
    max_files: int | None = None  # explicit cap: a deterministic hash-ordered sample of this many files


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
    shuffle_buffer: int = 2048  # rows in each worker's local shuffle buffer (0: stream order)
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


@dataclass
class ReaderConfig:
    """How raw files become records, and what counts as bad input."""

    max_record_bytes: int = 8_000_000  # a longer record (file, JSONL line) is dropped as record_too_large
    on_invalid_utf8: str = "drop"  # drop | replace (decode with U+FFFD and keep)
    binary_sniff_bytes: int = 8192  # a NUL byte in this many leading bytes marks a binary file
    bytes_per_task: int = 4_000_000  # input bytes per Ray Data read task (smaller when that gives under one task per CPU)
    records_per_batch: int = 512  # records per emitted block while reading one file
    quarantine: bool = True  # write quarantine.jsonl (path, record, reason, excerpt) for every bad record


@dataclass
class NormalizeConfig:
    enabled: bool = True
    form: str = "NFC"  # NFC | NFKC | NFD | NFKD
    strip_control: bool = True  # drop C0/C1 control characters except tab and newline; CRLF -> LF


@dataclass
class FilterConfig:
    """Quality filters; a document failing one is dropped and counted under that filter's name."""

    enabled: bool = True
    min_chars: int = 64
    max_chars: int = 1_000_000
    max_non_printable_frac: float = 0.05  # measured before control characters are stripped
    max_repeated_line_frac: float = 0.5  # fraction of non-blank line characters in repeated lines
    max_repeated_ngram_frac: float = 0.7  # fraction of word n-grams that repeat an earlier one
    ngram_n: int = 5


@dataclass
class DedupConfig:
    exact: bool = True  # drop documents whose normalized content hash was already seen
    near: bool = True  # MinHash + LSH near-duplicate removal
    threshold: float = 0.85  # estimated Jaccard similarity of word shingles at which documents are duplicates
    num_perm: int = 128
    shingle_size: int = 5  # words per shingle
    seed: int = 1


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained with `tokenizers` on a deterministic sample of the train split."""

    sample_bytes: int = 4_000_000
    min_frequency: int = 2
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>", "<|pad|>"])
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"


@dataclass
class RuntimeConfig:
    """Ray Data execution knobs: they change speed, never the output."""

    address: str | None = None  # None: start a local Ray (unless RAY_ADDRESS is set)
    num_cpus: int | None = None  # local Ray only
    tokenize_actors: int = 2  # size of the tokenizer actor pool (at most one actor per work unit)
    tokenize_batch_docs: int = 64  # documents per tokenize+pack batch (also sets packing boundaries)
    rows_per_shard: int = 4096  # sequences per output Parquet shard
    progress_bars: bool = True


@dataclass
class PreprocessConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    force: bool = False  # rebuild even if an output with the same config and inputs exists


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="preprocess_schema", node=PreprocessConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Composed Hydra config -> validated `TrainConfig` (raises ConfigError naming the key and fix)."""
    return validate_train_config(to_dataclass(cfg, TrainConfig, "train_schema"))


def check(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless `cond`: messages name the key, the value and the fix."""
    if not cond:
        raise ConfigError(message)


T = TypeVar("T")


def to_dataclass(cfg: DictConfig, cls: type[T], schema: str) -> T:
    """A composed DictConfig -> the dataclass instance its schema describes."""
    obj: Any = OmegaConf.to_object(cfg)
    if not isinstance(obj, cls):
        raise ConfigError(f"the config did not compose against its schema ({schema}); keep `{schema}` first "
                          "in the defaults list.")
    return obj


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/<name>.yaml with overrides outside `@hydra.main` (library callers, app builders)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()


def validate_train_config(c: TrainConfig) -> TrainConfig:
    c.model.validate(seq_len=c.data.seq_len)
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
    for key, value in (("parallel.ep", p.ep), ("parallel.pp", p.pp)):
        check(value >= 1, f"{key}={value} must be >= 1.")
    check(p.dp == -1 or p.dp >= 1, f"parallel.dp={p.dp} must be >= 1, or -1 for 'the rest of the world'.")
    check(c.model.moe.n_routed_experts % p.ep == 0,
           f"model.moe.n_routed_experts={c.model.moe.n_routed_experts} is not divisible by parallel.ep={p.ep}; "
           "choose an ep that divides the number of experts.")
    return c


_SOURCE_KINDS = ("stdlib", "text", "jsonl", "parquet")
_NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")


def to_preprocess_config(cfg: DictConfig) -> PreprocessConfig:
    """Composed Hydra config -> validated `PreprocessConfig` (raises ConfigError naming the key and fix)."""
    return validate_preprocess_config(to_dataclass(cfg, PreprocessConfig, "preprocess_schema"))


def validate_preprocess_config(c: PreprocessConfig) -> PreprocessConfig:
    d = c.data
    check(len(d.sources) > 0, "data.sources is empty; add at least one source, e.g. data.sources=[{kind: stdlib}].")
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        check(s.kind in _SOURCE_KINDS, f"{key}.kind={s.kind!r}: use one of {', '.join(_SOURCE_KINDS)}.")
        check(s.kind == "stdlib" or bool(s.path),
               f"{key}.kind={s.kind} needs {key}.path (a file, directory or glob).")
        check(s.weight >= 0, f"{key}.weight={s.weight} must be >= 0 (0 keeps the source out of the train split).")
        check(s.max_files is None or s.max_files > 0, f"{key}.max_files={s.max_files} must be positive or null.")
        check(bool(s.field), f"{key}.field is empty; name the JSONL field / Parquet column holding the text.")
    check(d.seq_len > 0, f"data.seq_len={d.seq_len} must be positive.")
    check(0 <= d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be within [0, 1).")
    t = c.tokenizer
    check(t.eos_token in t.special_tokens and t.pad_token in t.special_tokens,
           f"tokenizer.eos_token={t.eos_token!r} and tokenizer.pad_token={t.pad_token!r} must both be listed in "
           f"tokenizer.special_tokens={t.special_tokens}.")
    check(d.vocab_size >= 256 + len(t.special_tokens),
           f"data.vocab_size={d.vocab_size} is below the 256 byte symbols + {len(t.special_tokens)} special tokens "
           "of a byte-level BPE; raise data.vocab_size.")
    check(t.sample_bytes > 0, f"tokenizer.sample_bytes={t.sample_bytes} must be positive.")
    check(c.normalize.form in _NORMAL_FORMS,
           f"normalize.form={c.normalize.form!r}: use one of {', '.join(_NORMAL_FORMS)}.")
    check(c.reader.on_invalid_utf8 in ("drop", "replace"),
           f"reader.on_invalid_utf8={c.reader.on_invalid_utf8!r}: use drop or replace.")
    for key, value in (("reader.max_record_bytes", c.reader.max_record_bytes),
                       ("reader.binary_sniff_bytes", c.reader.binary_sniff_bytes),
                       ("reader.bytes_per_task", c.reader.bytes_per_task),
                       ("reader.records_per_batch", c.reader.records_per_batch),
                       ("filters.ngram_n", c.filters.ngram_n), ("dedup.num_perm", c.dedup.num_perm),
                       ("dedup.shingle_size", c.dedup.shingle_size),
                       ("runtime.tokenize_actors", c.runtime.tokenize_actors),
                       ("runtime.tokenize_batch_docs", c.runtime.tokenize_batch_docs),
                       ("runtime.rows_per_shard", c.runtime.rows_per_shard)):
        check(value > 0, f"{key}={value} must be positive.")
    f = c.filters
    check(0 <= f.min_chars <= f.max_chars,
           f"filters.min_chars={f.min_chars} and filters.max_chars={f.max_chars} need 0 <= min_chars <= max_chars.")
    for key, value in (("filters.max_non_printable_frac", f.max_non_printable_frac),
                       ("filters.max_repeated_line_frac", f.max_repeated_line_frac),
                       ("filters.max_repeated_ngram_frac", f.max_repeated_ngram_frac)):
        check(0 <= value <= 1, f"{key}={value} must be within [0, 1] (1 disables the filter).")
    check(0 < c.dedup.threshold <= 1, f"dedup.threshold={c.dedup.threshold} must be within (0, 1].")
    return c
