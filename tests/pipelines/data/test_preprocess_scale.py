"""Preprocessing that scales: dedup on the cluster keeps exactly what the one-process reference
(`dedup.decide`) keeps, the driver's memory does not grow with the number of documents, and the
seeded train shuffle is a permutation of the in-order sequences.

One synthetic JSONL corpus at two sizes (1x and 4x documents, with exact copies and one-word
edits spread over both sizes) goes through the real pipeline on the shared local Ray.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from moe.files import TOKENIZER_FILE
from pipelines.data import dedup
from pipelines.data.config import DedupConfig
from pipelines.data.dedup_cluster import (
    KEY_COLUMNS,
    band_rows,
    bucket_edges,
    good_keys,
    load_dropped,
    mark_exact,
    resolve_edges,
)
from pipelines.data.ingest import read_manifest
from pipelines.data.minhash import lsh_params, signature
from pipelines.data.pipeline import (
    configure_data_context,
    run_preprocess,
    stage_corpus,
    train_corpus_tokenizer,
    write_dataset,
)
from pipelines.data.sources import resolve_sources

N_DOCS = 2400  # documents at 1x (the per-document signal above the driver heap's noise of a few hundred KB)
WORDS = [f"w{i:04d}x" for i in range(3000)]


def _corpus(root: Path, n: int) -> Path:
    """`n` distinct 100-word documents in 4 JSONL files, then exact copies of every 10th and
    one-word edits (near duplicates) of every 7th, and one edit of an edit (a chain)."""
    rng = np.random.default_rng(0)  # the same first documents at every size
    docs = [" ".join(rng.choice(WORDS, 100)) for _ in range(n)]
    extra = [docs[i] for i in range(0, n, 10)]
    for i in range(3, n, 7):
        words = docs[i].split()
        words[50] = "edited"
        extra.append(" ".join(words))
    extra.append(extra[-1].replace("edited", "edited again", 1))
    root.mkdir(parents=True)
    lines = docs + extra
    for f in range(4):
        with (root / f"part{f}.jsonl").open("w") as fh:
            for line in lines[f::4]:
                fh.write(json.dumps({"text": line}) + "\n")
    return root


def _reference_dropped(staging: list[str], cfg) -> dict[str, str]:
    keys = pa.concat_tables([pq.read_table(p, columns=KEY_COLUMNS) for p in staging])
    return dedup.decide(keys.filter(pc.equal(keys.column("reason"), "")), cfg.dedup).dropped


def _build(cfg, work: Path) -> tuple[dict, int, dict[str, str], dict[str, str]]:
    """Phases A-D as `build_dataset` runs them, with the driver's Python heap traced (tracemalloc)
    and its Arrow pool's peak; -> (manifest counts, peak bytes, dropped by the cluster, by the reference)."""
    files, missing = resolve_sources(cfg.data.sources)
    configure_data_context(cfg)
    work.mkdir(parents=True)
    tracemalloc.start()
    corpus = stage_corpus(cfg, files, missing, work)
    _, peak_b = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    staging = sorted(str(p) for p in corpus.docs.glob("*.parquet"))
    cluster = dict(load_dropped(str(corpus.dropped_dir)))
    reference = _reference_dropped(staging, cfg)  # untraced: the reference holds every key
    tracemalloc.start()
    train_corpus_tokenizer(cfg, corpus, work / TOKENIZER_FILE)
    write_dataset(cfg, corpus, work / TOKENIZER_FILE, work)
    _, peak_d = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    facts = corpus.facts
    counts = {"docs": sum(sum(c.values()) for c in facts.splits.docs.values()), "exact": facts.dedup_result.exact_dropped,
              "near": facts.dedup_result.near_dropped}
    return counts, max(peak_b, peak_d), cluster, reference


@pytest.fixture(scope="module")
def two_sizes(ray_cluster, preprocess_cfg, tmp_path_factory) -> dict[int, tuple]:
    root = tmp_path_factory.mktemp("scale")
    out = {}
    for scale in (1, 4):
        src = _corpus(root / f"in{scale}", N_DOCS * scale)
        cfg = preprocess_cfg(root / f"out{scale}", f"data.sources=[{{kind:jsonl,path:{src}}}]",
                             "tokenizer.sample_bytes=100000", "runtime.tokenize_batch_docs=64")
        out[scale] = _build(cfg, root / f"work{scale}")
    return out


def test_cluster_dedup_keeps_what_the_reference_keeps(two_sizes) -> None:
    for scale, (counts, _, cluster, reference) in two_sizes.items():
        n = N_DOCS * scale
        assert cluster == reference, f"x{scale}: the cluster dedup and the reference disagree"
        assert counts["exact"] == len(range(0, n, 10)) and counts["near"] >= 0.8 * len(range(3, n, 7))
        assert counts["exact"] + counts["near"] == len(reference)


def test_driver_memory_does_not_grow_with_documents(two_sizes) -> None:
    (_, peak1, _, _), (_, peak4, _, _) = two_sizes[1], two_sizes[4]
    extra_docs = 3 * N_DOCS * 1.24  # 3x the documents and their copies and edits more at 4x
    # The driver keeps a few numbers per staging file (128 records each) and per work unit; the
    # one-process reference held about 250 bytes of Python objects per document.
    assert (peak4 - peak1) / extra_docs < 60, (peak1, peak4)


def test_dedup_groups_match_the_reference_in_process() -> None:
    """The Ray Data functions applied by hand (group by hash, group by bucket, resolve) on long
    chains of near duplicates across sources and out of order: the same drops as `decide`."""
    rng = np.random.default_rng(3)
    base = [" ".join(rng.choice(WORDS, 120)) for _ in range(12)]
    docs = []
    for i in range(60):
        words = base[i % 12].split()
        for j in range(i // 12):  # 0..4 edits: chains of growing distance
            words[10 + 7 * j] = f"e{i}"
        docs.append((i % 3, f"f{59 - i:02d}", i % 5, " ".join(words)))
    docs += [docs[5], docs[17]]  # exact copies at other positions
    docs[-2], docs[-1] = (2, "z", 9, docs[5][3]), (0, "a", 0, docs[17][3])
    cfg = DedupConfig(threshold=0.8)
    keys = pa.table({
        "source": pa.array([d[0] for d in docs], pa.int32()), "path": [d[1] for d in docs],
        "record": pa.array([d[2] for d in docs], pa.int64()), "reason": [""] * len(docs),
        "uid": [dedup.record_uid(*d[:3]) for d in docs], "hash": [dedup.content_hash(d[3]) for d in docs],
        "minhash": pa.array([signature(d[3], cfg.num_perm, cfg.shingle_size, cfg.seed).tolist() for d in docs],
                            pa.list_(pa.uint32())),
    })
    reference = dedup.decide(keys, cfg)
    good = good_keys(keys)
    marked = pa.concat_tables([mark_exact(good.filter(pc.equal(good.column("hash"), h)))
                               for h in sorted(set(good.column("hash").to_pylist()))])
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    banded = band_rows(marked, cfg.num_perm, bands, rows)
    edges = pa.concat_tables([bucket_edges(banded.filter(pc.equal(banded.column("bucket"), b)), cfg.threshold,
                                           cfg.num_perm) for b in sorted(set(banded.column("bucket").to_pylist()))])
    near = resolve_edges(edges)
    exact = marked.filter(pc.equal(marked.column("dup"), dedup.EXACT_DUPLICATE)).column("uid").to_pylist()
    ours = dict.fromkeys(exact, dedup.EXACT_DUPLICATE) | dict(zip(near.column("uid").to_pylist(),
                                                               near.column("reason").to_pylist()))
    assert ours == reference.dropped
    assert reference.exact_dropped == 2 and reference.near_dropped >= 30


def test_train_shuffle_permutes_the_in_order_sequences(tiny_dataset: Path, tiny_cfg) -> None:
    shuffled = run_preprocess(dataclasses.replace(tiny_cfg, shuffle=dataclasses.replace(tiny_cfg.shuffle,
                                                                                         enabled=True, seed=3)))
    a, b = read_manifest(tiny_dataset), read_manifest(shuffled)
    assert b["shuffle"] == {"train": True, "seed": 3} and a["shuffle"]["train"] is False
    assert a["splits"]["train"]["sequences"] == b["splits"]["train"]["sequences"]
    assert a["splits"]["train"]["shards"] == b["splits"]["train"]["shards"]
    for split in ("train", "val"):
        ta = pq.read_table(sorted((tiny_dataset / split).glob("*.parquet")))
        tb = pq.read_table(sorted((shuffled / split).glob("*.parquet")))
        assert tb.column("seq_id").to_pylist() == list(range(len(tb)))  # dense and in file order
        rows_a = [tuple(r) for r in ta.column("tokens").to_pylist()]
        rows_b = [tuple(r) for r in tb.column("tokens").to_pylist()]
        assert sorted(rows_a) == sorted(rows_b)  # the same sequences
        if split == "val":
            assert rows_a == rows_b  # validation stays in packing order
        else:
            moved = np.mean([x != y for x, y in zip(rows_a, rows_b)])
            assert moved > 0.9, moved
    for f in sorted((shuffled / "train").glob("*.parquet"))[:-1]:
        assert pq.read_metadata(f).num_rows == tiny_cfg.runtime.rows_per_shard
