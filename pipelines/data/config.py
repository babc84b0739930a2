"""Typed configs of the corpus and of preprocessing (`conf/preprocess.yaml`, `conf/data/`), their
cross-field checks and Hydra registration. `DataConfig` is shared with training, which reads what
preprocessing wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pipelines.core.config import check, compose_config, to_dataclass
from pipelines.core.tracking import TrackingConfig


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
class ShuffleConfig:
    """The train split's order in its shards: packing order, or a seeded global shuffle of its sequences."""

    enabled: bool = False  # true: seq_id order is a seeded permutation of the packed sequences
    seed: int = 0


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
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    force: bool = False  # rebuild even if an output with the same config and inputs exists


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="preprocess_schema", node=PreprocessConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)


def compose_preprocess_config(overrides: list[str] | None = None) -> PreprocessConfig:
    """conf/preprocess.yaml with overrides -> validated `PreprocessConfig` (library callers, benchmarks)."""
    register_configs()
    return to_preprocess_config(compose_config("preprocess", overrides))


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
