"""The preprocessing plan: Ray Data stages, corpus-wide decisions, versioned output (`run_preprocess`).

  A  (Ray Data, streaming)  files -> read -> normalize -> filter -> sign  -> staging Parquet (_docs/)
  B  (Ray Data, shuffles)   exact dedup grouped (sorted) by content hash, near dedup by LSH bucket,
                            groups resolved by one task (`dedup_cluster`) -> dropped uids (_dedup/)
     (Ray Data, per file)   counts by reason, split, source; kept documents per staging file (`tally`)
  C  (Ray Data + driver)    workers pick a hash-chosen sample of the train split (about
                            `tokenizer.sample_bytes`), the driver trains the byte-level BPE on it
  D  (Ray actors)           split + weights -> tokenize + pack, one packed file per work unit
                            (`tokenize_phase`); then Ray tasks write train/ and val/ shards with
                            seq_id 0..N-1 planned from the per-unit counts (`shards`; the train
                            split optionally shuffled); manifest last.

The driver handles plans, counts and the manifest: per staging file, per work unit and per
shard a few numbers, never a per-document list, so its memory does not grow with the corpus.
`build_dataset` runs the phases in order through one public function each: `stage_corpus` (A, B),
`train_corpus_tokenizer` (C), `write_dataset` (D), `build_manifest`; each phase's wall seconds go
to the manifest's `stage_seconds`.

Output goes to a temporary directory renamed to `v<NNNN>-<key>` only when complete, so an
interrupted run never leaves a half output that "latest" could pick up.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cluster.runtime import RayOptions, start_or_connect
from moe.files import TOKENIZER_FILE
from pipelines.data import dedup, manifest, sources
from pipelines.data.clean import normalize_batch
from pipelines.data.config import PreprocessConfig, RuntimeConfig
from pipelines.data.dedup_cluster import run_dedup
from pipelines.data.filters import FILTER_NAMES, filter_batch
from pipelines.data.metrics import record_run
from pipelines.data.minhash import lsh_params
from pipelines.data.shards import SplitOutput, write_in_order, write_shuffled
from pipelines.data.split import SPLITS, TRAIN
from pipelines.data.staging import path_blocks, write_bad_records
from pipelines.data.tally import SplitTally, sample_texts, tally
from pipelines.data.tokenize_phase import TokenizePlan, cut_units, tokenize_and_pack, unit_count
from pipelines.data.tokenizer import file_sha256, load_tokenizer, special_id, train_tokenizer

BAD_INPUT_REASONS = (sources.UNREADABLE_PATH, sources.UNREADABLE, sources.EMPTY_FILE, sources.BINARY_FILE,
                     sources.INVALID_UTF8, sources.MALFORMED_JSON, sources.NOT_AN_OBJECT, sources.MISSING_FIELD,
                     sources.FIELD_NOT_STRING, sources.RECORD_TOO_LARGE)
QUARANTINE_FILE = "quarantine.jsonl"


class NoUsableInputError(RuntimeError):
    """Nothing to train on: no input files, or every record was bad or filtered away."""


@dataclasses.dataclass
class CorpusFacts:
    """What the phases learned about the corpus, for the manifest."""

    n_read: int  # staged records (every record of every readable file)
    n_missing: int  # source paths that matched nothing
    good: int
    bad: dict[str, int]
    filtered: dict[str, int]
    dedup_result: dedup.DedupResult  # counts only (`dropped` stays empty: the decisions are on disk)
    splits: SplitTally
    stage_seconds: dict[str, float]  # wall seconds per phase, in the order they ran
    sample_stats: dict[str, int] = dataclasses.field(default_factory=lambda: {"documents": 0, "bytes": 0})
    n_quarantined: int | None = None  # quarantine records written (None: reader.quarantine is off)


@dataclasses.dataclass
class StagedCorpus:
    """Phases A and B's result: the staged documents and what was decided about them, for phases C and D."""

    docs: Path  # staging Parquet directory (removed by `write_dataset`)
    dropped_dir: Path  # dedup's decisions: (uid, reason) of every dropped document
    missing: list[tuple[int, str]]  # (source, path) of source paths that matched nothing
    facts: CorpusFacts


class ClusterTooSmallError(RuntimeError):
    """The tokenizer actor pool cannot start on this cluster, so phase D would wait forever."""


def check_cluster_fits(cfg: PreprocessConfig, cluster_cpus: float) -> None:
    """Each tokenizer actor holds one CPU; checked before reading so no work is spent first."""
    need = cfg.runtime.tokenize_actors
    if cluster_cpus < need:
        raise ClusterTooSmallError(
            f"runtime.tokenize_actors={need} needs a Ray cluster with at least {need} CPUs (one per tokenizer "
            f"actor); this one has {cluster_cpus:g}. Lower runtime.tokenize_actors or give Ray more CPUs "
            "(runtime.num_cpus for a local Ray; logical CPUs may exceed cores).")


def describe_sources(cfg: PreprocessConfig) -> str:
    return "; ".join(f"data.sources[{i}]: kind={s.kind}" + (f" path={s.path}" if s.kind != "stdlib" else "")
                     for i, s in enumerate(cfg.data.sources))


def ray_options(rt: RuntimeConfig) -> RayOptions:
    """How preprocessing starts or connects Ray (cluster.runtime is the one place that does it)."""
    num_cpus = rt.num_cpus or max(4, os.cpu_count() or 1)
    # Ray starts workers at niceness 15 by default; on a shared machine that hands the CPU to every
    # other process. Preprocessing is the job here, so its workers run at normal priority.
    # Ray kills idle workers once it has more than num_cpus; while the tokenizer actors lived,
    # that killed warm read workers, and the next phase A started them again (1.4 CPU-s each).
    # Measured on 300 stdlib files: phase A 2.9 s, 1.3 s with room for both.
    return RayOptions(address=rt.address, env_vars={"TOKENIZERS_PARALLELISM": "false"}, num_cpus=num_cpus,
                      worker_niceness=0, worker_soft_limit=num_cpus + rt.tokenize_actors)


def ensure_ray(rt: RuntimeConfig) -> None:
    """Connect preprocessing to Ray; a local Ray it starts lives as long as this process."""
    start_or_connect(ray_options(rt))


def configure_data_context(cfg: PreprocessConfig) -> None:
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs -> same shards, byte for byte
    # Each phase is one short job that owns the cluster; per-operator reservations only held CPUs
    # back (measured: phase A ran about one task at a time on 2 cores with them).
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = cfg.runtime.progress_bars
    # Dedup and the train shuffle group rows by key. The hash-based strategies start aggregator
    # actors (measured: 24-48 s for a 20,000-row groupby on 2 cores against 1.4-1.6 s); the
    # sort-based one runs as tasks on the warm workers.
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def build_docs(cfg: PreprocessConfig, files: list[sources.InputFile], out: Path) -> None:
    """Phase A: every record of every file, with reason, normalized text, uid, hash and MinHash."""
    import ray.data

    groups = sources.read_tasks(files, cfg.reader.bytes_per_task, int(ray.cluster_resources().get("CPU", 1)))
    tables = [sources.files_table(group) for group in groups]
    ds = ray.data.from_arrow(tables)
    ds = ds.map_batches(sources.read_files, batch_format="pyarrow", batch_size=None, fn_kwargs={"rc": cfg.reader})
    ds = ds.map_batches(normalize_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={"cfg": cfg.normalize})
    ds = ds.map_batches(filter_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={"cfg": cfg.filters})
    ds = ds.map_batches(dedup.sign_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={"cfg": cfg.dedup})
    # Many small files, so phase D reads them as many blocks and every tokenizer actor gets work.
    ds.write_parquet(str(out), max_rows_per_file=cfg.runtime.tokenize_batch_docs * 2)


def _parquet_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.parquet"))


def write_quarantine(docs: Path, missing: list[tuple[int, str]], out: Path) -> int:
    """The source paths that matched nothing, then the bad records of the staging files -> `out` as
    JSON lines, written by a Ray task (the scan reads every staged record, which the driver never
    does); -> how many."""
    import ray

    head = [{"source": src, "path": path, "record": -1, "reason": sources.UNREADABLE_PATH,
             "excerpt": "no file matches this path or glob"} for src, path in missing]
    files = [str(p) for p in _parquet_files(docs)]
    return ray.get(ray.remote(write_bad_records).remote(files, list(BAD_INPUT_REASONS), head, str(out)))


def tokenizer_sample(cfg: PreprocessConfig, corpus: StagedCorpus, stats: dict[str, int]) -> Iterator[str]:
    """Phase C input: a deterministic, hash-chosen ~`sample_bytes` of train-split documents, picked
    on the workers and streamed to the driver in staging order."""
    import ray.data

    rate = min(1.0, cfg.tokenizer.sample_bytes / max(corpus.facts.splits.train_bytes, 1))
    staging = [f for f, _, _ in corpus.facts.splits.files]
    ds = ray.data.from_arrow(path_blocks(staging))
    ds = ds.map_batches(sample_texts, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"dropped_dir": str(corpus.dropped_dir), "val_fraction": cfg.data.val_fraction,
                                   "rate": rate})
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for text in batch.column("text").to_pylist():
            stats["documents"] += 1
            stats["bytes"] += len(text)
            yield text


def _no_input_message(cfg: PreprocessConfig, bad: dict[str, int], filtered: dict[str, int]) -> str:
    f = cfg.filters
    return (f"no usable documents from {describe_sources(cfg)}. Bad input by reason: {bad or 'none'}; "
            f"dropped by filters: {filtered or 'none'} (filters.min_chars={f.min_chars}, "
            f"filters.max_chars={f.max_chars}, filters.max_non_printable_frac={f.max_non_printable_frac}, "
            f"filters.max_repeated_line_frac={f.max_repeated_line_frac}, "
            f"filters.max_repeated_ngram_frac={f.max_repeated_ngram_frac}). Point data.sources at readable text "
            "or relax the filters (filters.enabled=false disables them).")


def run_preprocess(cfg: PreprocessConfig) -> Path:
    """Preprocess `cfg.data.sources` into a versioned output directory; returns it (existing if unchanged)."""
    return preprocess(cfg)[0]


def preprocess(cfg: PreprocessConfig) -> tuple[Path, bool]:
    """-> (output directory, whether an existing output with the same config and inputs was reused)."""
    root = Path(cfg.data.output_dir).expanduser().resolve()
    files, missing = sources.resolve_sources(cfg.data.sources)
    if not files:
        raise NoUsableInputError(
            f"no input files: {describe_sources(cfg)} match nothing "
            f"({', '.join(p for _, p in missing)}). Fix data.sources[*].path (a file, directory or glob).")
    fingerprints = sources.fingerprint_files(files, missing, len(cfg.data.sources))
    cfg_hash = manifest.config_hash(cfg)
    key = manifest.output_key(cfg_hash, fingerprints)
    existing = manifest.find_existing(root, key)
    if existing is not None and not cfg.force:
        print(f"[preprocess] config and inputs unchanged: reusing {existing}")
        return existing, True

    ensure_ray(cfg.runtime)
    import ray

    check_cluster_fits(cfg, ray.cluster_resources().get("CPU", 0.0))
    configure_data_context(cfg)
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        info = build_dataset(cfg, files, missing, fingerprints, cfg_hash, key, work)
        record_run(info)
        final = root / manifest.next_version_name(root, key)
        info["version"] = final.name
        manifest.write_json(work / manifest.MANIFEST_FILE, info)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final, False


def build_dataset(cfg: PreprocessConfig, files: list[sources.InputFile], missing: list[tuple[int, str]],
                  fingerprints: list[dict], cfg_hash: str, key: str, work: Path) -> dict[str, Any]:
    """Phases A-D into `work`; -> its manifest (with `version` still None), phase times in `stage_seconds`."""
    t_start = time.perf_counter()
    corpus = stage_corpus(cfg, files, missing, work)
    tok_path = work / TOKENIZER_FILE
    train_corpus_tokenizer(cfg, corpus, tok_path)
    writers = write_dataset(cfg, corpus, tok_path, work)
    corpus.facts.stage_seconds["total"] = time.perf_counter() - t_start
    return build_manifest(cfg, corpus.facts, writers, fingerprints, cfg_hash, key, tok_path)


@contextmanager
def _timed(times: dict[str, float], stage: str) -> Iterator[None]:
    """Records the block's wall seconds as `times[stage]` (the manifest's `stage_seconds`)."""
    t0 = time.perf_counter()
    yield
    times[stage] = time.perf_counter() - t0


def stage_corpus(cfg: PreprocessConfig, files: list[sources.InputFile], missing: list[tuple[int, str]],
                 work: Path) -> StagedCorpus:
    """Phases A and B: stage every record under `work`, decide duplicates on the cluster, then count
    splits and weights per staging file.

    Raises NoUsableInputError when no record is good, or when nothing is left for the train split."""
    times: dict[str, float] = {}
    docs = work / "_docs"
    with _timed(times, "read_normalize_filter_sign"):
        build_docs(cfg, files, docs)
    staging = [str(p) for p in _parquet_files(docs)]
    with _timed(times, "dedup"):
        dropped_dir = run_dedup(staging, cfg.dedup, work / "_dedup")
    with _timed(times, "count"):
        splits = tally(staging, str(dropped_dir), cfg.data.val_fraction, [s.weight for s in cfg.data.sources])
    good, bad, filtered = _count_reasons(cfg, splits, missing)
    dd = splits.dropped
    result = dedup.DedupResult(dropped={}, docs_in=good, exact_dropped=dd[dedup.EXACT_DUPLICATE],
                               near_dropped=dd[dedup.NEAR_DUPLICATE])
    if splits.weighted[TRAIN] == 0:
        raise NoUsableInputError(
            f"every document was removed as a duplicate, went to validation or has weight 0 "
            f"({describe_sources(cfg)}; dedup dropped {result.exact_dropped} exact and {result.near_dropped} "
            f"near duplicates, validation has {sum(splits.docs['val'].values())}). Add input, lower "
            "data.val_fraction or raise dedup.threshold.")
    facts = CorpusFacts(n_read=sum(n for _, n, _ in splits.files), n_missing=len(missing), good=good, bad=bad,
                        filtered=filtered, dedup_result=result, splits=splits, stage_seconds=times)
    return StagedCorpus(docs=docs, dropped_dir=dropped_dir, missing=missing, facts=facts)


def _count_reasons(cfg: PreprocessConfig, splits: SplitTally, missing: list[tuple[int, str]]
                   ) -> tuple[int, dict[str, int], dict[str, int]]:
    """-> (good records, bad input by reason, records dropped by each filter); raises when none is good."""
    reasons = Counter(splits.reasons)
    good = reasons.pop("", 0)
    bad = {r: reasons[r] for r in BAD_INPUT_REASONS if reasons.get(r)}
    if missing:
        bad[sources.UNREADABLE_PATH] = len(missing)
    filtered = {name: reasons.get(name, 0) for name in FILTER_NAMES}
    if good == 0:
        raise NoUsableInputError(_no_input_message(cfg, bad, {k: v for k, v in filtered.items() if v}))
    return good, bad, filtered


def train_corpus_tokenizer(cfg: PreprocessConfig, corpus: StagedCorpus, out: Path) -> None:
    """Phase C: byte-level BPE trained on a hash-chosen sample of the train split, saved to `out`."""
    facts = corpus.facts
    with _timed(facts.stage_seconds, "tokenizer_train"):
        train_tokenizer(tokenizer_sample(cfg, corpus, facts.sample_stats), cfg.data.vocab_size, cfg.tokenizer, out)


def write_dataset(cfg: PreprocessConfig, corpus: StagedCorpus, tokenizer: Path, work: Path
                  ) -> dict[str, SplitOutput]:
    """Phase D: the kept documents, tokenized with `tokenizer` and packed by the actor pool (one
    file per unit), then written as train/ and val/ shards under `work` by Ray tasks; then the
    quarantine file, and the staged documents and unit files are removed."""
    facts = corpus.facts
    plan = _tokenize_plan(cfg, corpus, tokenizer, work / "_units")
    with _timed(facts.stage_seconds, "tokenize_pack"):
        counts = tokenize_and_pack(cfg, plan)
    with _timed(facts.stage_seconds, "write_shards"):
        outputs = _write_splits(cfg, plan.unit_dir, counts, work)
    with _timed(facts.stage_seconds, "quarantine_cleanup"):
        if cfg.reader.quarantine:
            facts.n_quarantined = write_quarantine(corpus.docs, corpus.missing, work / QUARANTINE_FILE)
        for d in (corpus.docs, corpus.dropped_dir.parent, Path(plan.unit_dir)):
            shutil.rmtree(d, ignore_errors=True)
    return outputs


def _write_splits(cfg: PreprocessConfig, unit_dir: str, counts: list[dict[str, int]], work: Path
                  ) -> dict[str, SplitOutput]:
    """Each split's shards from the per-unit row counts (the train split shuffled when `shuffle.enabled`)."""
    rows = cfg.runtime.rows_per_shard
    outputs = {}
    for split in SPLITS:
        unit_rows = [c[f"{split}_rows"] for c in counts]
        if split == TRAIN and cfg.shuffle.enabled:
            outputs[split] = write_shuffled(unit_dir, split, unit_rows, rows, cfg.shuffle.seed, work / split)
        else:
            outputs[split] = write_in_order(unit_dir, split, unit_rows, rows, work / split)
        expected = sum(c[f"{split}_tokens"] for c in counts)
        if outputs[split].tokens != expected:
            raise RuntimeError(f"{split}: the shards hold {outputs[split].tokens} tokens, the units {expected}")
    return outputs


def _tokenize_plan(cfg: PreprocessConfig, corpus: StagedCorpus, tokenizer: Path, unit_dir: Path) -> TokenizePlan:
    splits = corpus.facts.splits
    kept_F = np.asarray([k for _, _, k in splits.files], np.int64)
    bytes_F = np.asarray(splits.file_bytes, np.int64)
    return TokenizePlan(
        tokenizer_path=str(tokenizer), files=[(f, k) for f, _, k in splits.files], dropped_dir=str(corpus.dropped_dir),
        units=cut_units(kept_F, bytes_F, unit_count(cfg, int(bytes_F.sum())), cfg.runtime.tokenize_batch_docs),
        val_fraction=cfg.data.val_fraction, weights=[s.weight for s in cfg.data.sources], unit_dir=str(unit_dir))


def build_manifest(cfg: PreprocessConfig, facts: CorpusFacts, writers: dict[str, SplitOutput],
                   fingerprints: list[dict], cfg_hash: str, key: str, tok_path: Path) -> dict[str, Any]:
    """The manifest of a finished build (`version` None until the output directory is named)."""
    good, result, splits = facts.good, facts.dedup_result, facts.splits
    tok = load_tokenizer(tok_path)
    row_len = cfg.data.seq_len + 1
    bands, rows = lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
    return {
        "format": manifest.FORMAT,
        "version": None,
        "key": key,
        "config_hash": cfg_hash,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seq_len": cfg.data.seq_len,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_sha256": file_sha256(tok_path),
        "eos_id": special_id(tok, cfg.tokenizer.eos_token),
        "pad_id": special_id(tok, cfg.tokenizer.pad_token),
        "special_tokens": list(cfg.tokenizer.special_tokens),
        "splits": {
            s: {"sequences": w.sequences, "tokens": w.tokens, "padding_tokens": w.sequences * row_len - w.tokens,
                "documents": sum(splits.docs[s].values()), "documents_weighted": splits.weighted[s],
                "shards": w.shards}
            for s, w in writers.items()
        },
        "shuffle": {"train": cfg.shuffle.enabled, "seed": cfg.shuffle.seed},
        "inputs": [{"source": i, "kind": s.kind, "path": s.path if s.kind != "stdlib" else str(sources.stdlib_root()),
                    "field": s.field, "weight": s.weight, "max_files": s.max_files, **fingerprints[i]}
                   for i, s in enumerate(cfg.data.sources)],
        "records": {"read": facts.n_read + facts.n_missing, "good": good, "kept": good - len(result.dropped)},
        "bad_input": facts.bad,
        "filtered": facts.filtered,
        "dedup": {"docs_in": result.docs_in, "exact_dropped": result.exact_dropped,
                  "near_dropped": result.near_dropped, **result.rates(), "lsh_bands": bands, "lsh_rows": rows},
        "per_source": [{"source": i, **dict(c)} for i, c in enumerate(splits.per_source)],
        "tokenizer_sample": facts.sample_stats,
        "quarantine_file": QUARANTINE_FILE if facts.n_quarantined is not None else None,
        "quarantined": facts.n_quarantined,
        "stage_seconds": {k: round(v, 3) for k, v in facts.stage_seconds.items()},
        "config": manifest.hashed_config(cfg) | {"data": dataclasses.asdict(cfg.data)},
    }
