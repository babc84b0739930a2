"""The preprocessing plan: Ray Data stages, corpus-wide decisions, versioned output (`run_preprocess`).

  A  (Ray Data, streaming)  files -> read -> normalize -> filter -> sign  -> staging Parquet (docs/)
  B  (driver, small keys)   exact + near dedup over (uid, hash, minhash) of every kept document
  C  (driver, streaming)    byte-level BPE trained on a hash-chosen sample of the train split
  D  (Ray Data, streaming)  docs/ -> split + weights -> tokenize + pack (actor pool, `tokenize_phase`),
                            streamed to the driver, which writes train/ and val/ shards with seq_id
                            0..N-1; manifest last.

Output goes to a temporary directory renamed to `v<NNNN>-<key>` only when complete, so an
interrupted run never leaves a half output that "latest" could pick up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cluster.runtime import RayOptions, start_or_connect
from pipelines.data import dedup, manifest, sources
from pipelines.data.clean import normalize_batch
from pipelines.data.config import PreprocessConfig, RuntimeConfig
from pipelines.data.filters import FILTER_NAMES, filter_batch
from pipelines.data.minhash import lsh_params
from pipelines.data.split import SPLITS, TRAIN, assign_split, hash_unit, repeats
from pipelines.data.tokenize_phase import TokenizePlan, cut_units, tokenize_and_pack, unit_count
from pipelines.data.tokenizer import TOKENIZER_FILE, file_sha256, load_tokenizer, special_id, train_tokenizer

BAD_INPUT_REASONS = (sources.UNREADABLE_PATH, sources.UNREADABLE, sources.EMPTY_FILE, sources.BINARY_FILE,
                     sources.INVALID_UTF8, sources.MALFORMED_JSON, sources.NOT_AN_OBJECT, sources.MISSING_FIELD,
                     sources.FIELD_NOT_STRING, sources.RECORD_TOO_LARGE)
QUARANTINE_FILE = "quarantine.jsonl"
_KEY_COLUMNS = ["source", "path", "record", "reason", "uid", "hash", "minhash", "n_bytes"]


class NoUsableInputError(RuntimeError):
    """Nothing to train on: no input files, or every record was bad or filtered away."""


@dataclasses.dataclass
class CorpusFacts:
    """What phases A-C learned about the corpus, for the manifest."""

    n_read: int  # staged records (every record of every readable file)
    n_missing: int  # source paths that matched nothing
    good: int
    bad: dict[str, int]
    filtered: dict[str, int]
    dedup_result: dedup.DedupResult
    split_docs: dict[str, Counter]
    split_weighted: dict[str, int]
    per_source: list[Counter]
    sample_stats: dict[str, int]
    stage_seconds: dict[str, float]


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


def _configure_data_context(cfg: PreprocessConfig) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs -> same shards, byte for byte
    # Each phase is one short job that owns the cluster; per-operator reservations only held CPUs
    # back (measured: phase A ran about one task at a time on 2 cores with them).
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = cfg.runtime.progress_bars


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


def _keys(docs: Path) -> tuple[pa.Table, list[tuple[str, int]]]:
    """The key columns of every staged record in global row order, and (file, rows) of each staging file."""
    files = _parquet_files(docs)
    tables = [pq.read_table(p, columns=_KEY_COLUMNS) for p in files]
    return pa.concat_tables(tables), [(str(p), len(t)) for p, t in zip(files, tables)]


def write_quarantine(docs: Path, missing: list[tuple[int, str]], out: Path) -> int:
    dataset = pads.dataset([str(p) for p in _parquet_files(docs)], format="parquet")
    bad = pc.field("reason").isin(list(BAD_INPUT_REASONS))
    n = 0
    with out.open("w") as fh:
        for src, path in missing:
            fh.write(json.dumps({"source": src, "path": path, "record": -1, "reason": sources.UNREADABLE_PATH,
                                 "excerpt": "no file matches this path or glob"}) + "\n")
            n += 1
        for batch in dataset.to_batches(columns=["source", "path", "record", "reason", "excerpt"], filter=bad):
            for row in batch.to_pylist():
                fh.write(json.dumps(row) + "\n")
                n += 1
    return n


def tokenizer_sample(cfg: PreprocessConfig, docs: Path, dropped: set[str], train_bytes: int,
                     stats: dict[str, int]):
    """Phase C input: a deterministic, hash-chosen ~`sample_bytes` of train-split documents, streamed."""
    rate = min(1.0, cfg.tokenizer.sample_bytes / max(train_bytes, 1))
    dataset = pads.dataset([str(p) for p in _parquet_files(docs)], format="parquet")
    for batch in dataset.to_batches(columns=["uid", "hash", "reason", "text"], filter=pc.field("reason") == ""):
        for uid, h, text in zip(*(batch.column(c).to_pylist() for c in ("uid", "hash", "text"))):
            if uid in dropped or assign_split(h, cfg.data.val_fraction) != TRAIN or hash_unit(h, "tok") >= rate:
                continue
            stats["documents"] += 1
            stats["bytes"] += len(text)
            yield text


class _ShardWriter:
    """Rolls `<split>/part-NNNNN.parquet` files of `rows` sequences with seq_id 0..N-1."""

    SCHEMA = pa.schema([("seq_id", pa.int64()), ("tokens", pa.list_(pa.int32())),
                        ("loss_mask", pa.list_(pa.uint8()))])

    def __init__(self, d: Path, rows: int) -> None:
        self.d, self.rows = d, rows
        d.mkdir(parents=True, exist_ok=True)
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.sequences = 0
        self.tokens = 0
        self.shards: list[str] = []

    def add(self, t: pa.Table) -> None:
        self.tokens += int(pc.sum(t.column("n_tokens")).as_py() or 0)
        self.pending.append(t.select(["tokens", "loss_mask"]))
        self.n_pending += len(t)
        while self.n_pending >= self.rows:
            self._flush(self.rows)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self.pending).combine_chunks() if self.pending else self.SCHEMA.empty_table()
        head, rest = t.slice(0, n), t.slice(n)
        ids = pa.array(range(self.sequences, self.sequences + len(head)), pa.int64())
        name = f"part-{len(self.shards):05d}.parquet"
        pq.write_table(pa.table([ids, head.column("tokens"), head.column("loss_mask")], schema=self.SCHEMA),
                       self.d / name)
        self.shards.append(name)
        self.sequences += len(head)
        self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.n_pending or not self.shards:  # an empty split still gets one (empty) shard to read
            self._flush(self.n_pending)


def write_shards(packed: Iterable[pa.Table], out: Path, rows_per_shard: int) -> dict[str, _ShardWriter]:
    """Packed tables in order -> per-split shards with contiguous seq_ids (the driver's end of phase D)."""
    writers = {s: _ShardWriter(out / s, rows_per_shard) for s in SPLITS}
    for t in packed:
        for s in SPLITS:
            part = t.filter(pc.equal(t.column("split"), s))
            if len(part):
                writers[s].add(part)
    for w in writers.values():
        w.close()
    return writers


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
    _configure_data_context(cfg)
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        info = _build(cfg, files, missing, fingerprints, cfg_hash, key, work)
        final = root / manifest.next_version_name(root, key)
        info["version"] = final.name
        manifest.write_json(work / manifest.MANIFEST_FILE, info)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final, False


def _build(cfg: PreprocessConfig, files: list[sources.InputFile], missing: list[tuple[int, str]],
           fingerprints: list[dict], cfg_hash: str, key: str, work: Path,
           tokenizer: Path | None = None) -> dict[str, Any]:
    """Phases A-D into `work`; `tokenizer` reuses a trained tokenizer file instead of phase C (benchmarks)."""
    t_start = time.perf_counter()
    facts, plan = _phases_a_to_c(cfg, files, missing, work, tokenizer)
    t0 = time.perf_counter()
    writers = write_shards(tokenize_and_pack(cfg, plan), work, cfg.runtime.rows_per_shard)
    facts.stage_seconds["tokenize_pack_write"] = time.perf_counter() - t0
    docs = work / "_docs"
    t0 = time.perf_counter()
    n_quarantined = write_quarantine(docs, missing, work / QUARANTINE_FILE) if cfg.reader.quarantine else None
    shutil.rmtree(docs)
    facts.stage_seconds["quarantine_cleanup"] = time.perf_counter() - t0
    facts.stage_seconds["total"] = time.perf_counter() - t_start
    return _manifest(cfg, facts, writers, n_quarantined, fingerprints, cfg_hash, key, work / TOKENIZER_FILE)


def _phases_a_to_c(cfg: PreprocessConfig, files: list[sources.InputFile], missing: list[tuple[int, str]],
                   work: Path, tokenizer: Path | None) -> tuple[CorpusFacts, TokenizePlan]:
    """Read, dedup, split and train the tokenizer; -> (manifest facts, the plan for phase D)."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    docs = work / "_docs"
    build_docs(cfg, files, docs)
    times["read_normalize_filter_sign"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    keys, staging = _keys(docs)
    reasons = Counter(keys.column("reason").to_pylist())
    n_read = len(keys)
    good = reasons.pop("", 0)
    bad = {r: reasons[r] for r in BAD_INPUT_REASONS if reasons.get(r)}
    if missing:
        bad[sources.UNREADABLE_PATH] = len(missing)
    filtered = {name: reasons.get(name, 0) for name in FILTER_NAMES}
    if good == 0:
        raise NoUsableInputError(_no_input_message(cfg, bad, {k: v for k, v in filtered.items() if v}))
    kept_keys = keys.filter(pc.equal(keys.column("reason"), ""))
    result = dedup.decide(kept_keys, cfg.dedup)
    times["dedup"] = time.perf_counter() - t0

    weights = [s.weight for s in cfg.data.sources]
    split_docs = {s: Counter() for s in SPLITS}
    split_weighted = {s: 0 for s in SPLITS}
    train_bytes = 0
    per_source = [Counter() for _ in cfg.data.sources]
    kept_rows: list[int] = []  # global staging rows of the documents phase D tokenizes, in order
    kept_bytes: list[int] = []
    for row, (reason, src, uid, h, nb) in enumerate(zip(*(keys.column(c).to_pylist()
                                                          for c in ("reason", "source", "uid", "hash", "n_bytes")))):
        if reason:
            continue
        if uid in result.dropped:
            per_source[src][result.dropped[uid]] += 1
            continue
        s = assign_split(h, cfg.data.val_fraction)
        c = repeats(h, weights[src], s)
        split_docs[s][src] += 1
        split_weighted[s] += c
        per_source[src][s] += 1
        train_bytes += nb if s == TRAIN else 0
        if c:
            kept_rows.append(row)
            kept_bytes.append(nb * c)
    if split_weighted[TRAIN] == 0:
        raise NoUsableInputError(
            f"every document was removed as a duplicate, went to validation or has weight 0 "
            f"({describe_sources(cfg)}; dedup dropped {result.exact_dropped} exact and {result.near_dropped} "
            f"near duplicates, validation has {sum(split_docs['val'].values())}). Add input, lower "
            "data.val_fraction or raise dedup.threshold.")

    t0 = time.perf_counter()
    tok_path = work / TOKENIZER_FILE
    sample_stats = {"documents": 0, "bytes": 0}
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tok_path)
    else:
        train_tokenizer(tokenizer_sample(cfg, docs, set(result.dropped), train_bytes, sample_stats),
                        cfg.data.vocab_size, cfg.tokenizer, tok_path)
    times["tokenizer_train"] = time.perf_counter() - t0

    rows_K, bytes_K = np.asarray(kept_rows, np.int64), np.asarray(kept_bytes, np.int64)
    plan = TokenizePlan(
        tokenizer_path=str(tok_path), files=staging, dropped=set(result.dropped),
        units=cut_units(rows_K, bytes_K, unit_count(cfg, int(bytes_K.sum())), cfg.runtime.tokenize_batch_docs,
                        len(keys)),
        val_fraction=cfg.data.val_fraction, weights=weights)
    facts = CorpusFacts(n_read=n_read, n_missing=len(missing), good=good, bad=bad, filtered=filtered, dedup_result=result,
                        split_docs=split_docs, split_weighted=split_weighted, per_source=per_source,
                        sample_stats=sample_stats, stage_seconds=times)
    return facts, plan


def _manifest(cfg: PreprocessConfig, facts: CorpusFacts, writers: dict[str, _ShardWriter],
              n_quarantined: int | None, fingerprints: list[dict], cfg_hash: str, key: str,
              tok_path: Path) -> dict[str, Any]:
    good, result, split_docs, split_weighted = facts.good, facts.dedup_result, facts.split_docs, facts.split_weighted
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
                "documents": sum(split_docs[s].values()), "documents_weighted": split_weighted[s],
                "shards": w.shards}
            for s, w in writers.items()
        },
        "inputs": [{"source": i, "kind": s.kind, "path": s.path if s.kind != "stdlib" else str(sources.stdlib_root()),
                    "field": s.field, "weight": s.weight, "max_files": s.max_files, **fingerprints[i]}
                   for i, s in enumerate(cfg.data.sources)],
        "records": {"read": facts.n_read + facts.n_missing, "good": good, "kept": good - len(result.dropped)},
        "bad_input": facts.bad,
        "filtered": facts.filtered,
        "dedup": {"docs_in": result.docs_in, "exact_dropped": result.exact_dropped,
                  "near_dropped": result.near_dropped, **result.rates(), "lsh_bands": bands, "lsh_rows": rows},
        "per_source": [{"source": i, **dict(c)} for i, c in enumerate(facts.per_source)],
        "tokenizer_sample": facts.sample_stats,
        "quarantine_file": QUARANTINE_FILE if n_quarantined is not None else None,
        "quarantined": n_quarantined,
        "stage_seconds": {k: round(v, 3) for k, v in facts.stage_seconds.items()},
        "config": manifest.hashed_config(cfg) | {"data": dataclasses.asdict(cfg.data)},
    }
