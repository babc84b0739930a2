"""Deduplication keys and the reference decision.

`sign_batch` (a Ray Data stage) adds a stable `uid`, the content `hash` of the normalized text and
a MinHash signature. The rule: the first document in (source, path, record) order keeps its
content, exact repeats are dropped as `exact_duplicate`, and MinHash+LSH groups lose all but their
first member as `near_duplicate`. Preprocessing applies it on the cluster (`dedup_cluster`);
`decide` applies it in one process over the keys of every document and is kept as the reference:
the tests check that both keep the same documents, and the benchmark's plain loop uses it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipelines.data.minhash import near_duplicate_groups, signature

if TYPE_CHECKING:  # Ray workers import this module; they need no Hydra
    from pipelines.data.config import DedupConfig

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def record_uid(source: int, path: str, record: int) -> str:
    return hashlib.blake2b(f"{source}\0{path}\0{record}".encode(), digest_size=8).hexdigest()


def sign_batch(batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Adds `uid`, `hash` (empty for dropped records) and `minhash` (list<uint32>, empty unless near-dedup)."""
    sources = batch.column("source").to_pylist()
    paths = batch.column("path").to_pylist()
    records = batch.column("record").to_pylist()
    reasons = batch.column("reason").to_pylist()
    texts = batch.column("text").to_pylist()
    uids, hashes, sigs = [], [], []
    for src, path, rec, reason, text in zip(sources, paths, records, reasons, texts):
        uids.append(record_uid(src, path, rec))
        if reason:
            hashes.append("")
            sigs.append(np.zeros(0, np.uint32))
            continue
        hashes.append(content_hash(text))
        sigs.append(signature(text, cfg.num_perm, cfg.shingle_size, cfg.seed) if cfg.near else np.zeros(0, np.uint32))
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sigs])]).astype(np.int32)
    values = np.concatenate(sigs) if sigs else np.zeros(0, np.uint32)
    minhash = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.uint32), pa.uint32()))
    return (batch.append_column("uid", pa.array(uids, pa.string()))
            .append_column("hash", pa.array(hashes, pa.string()))
            .append_column("minhash", minhash))


@dataclass
class DedupResult:
    dropped: dict[str, str]  # uid -> exact_duplicate | near_duplicate
    docs_in: int
    exact_dropped: int
    near_dropped: int

    def rates(self) -> dict[str, float]:
        n = max(self.docs_in, 1)
        return {"exact_rate": self.exact_dropped / n, "near_rate": self.near_dropped / n,
                "total_rate": (self.exact_dropped + self.near_dropped) / n}


def decide(keys: pa.Table, cfg: DedupConfig) -> DedupResult:
    """`keys`: columns source, path, record, uid, hash, minhash of the documents that passed the filters."""
    keys = keys.sort_by([("source", "ascending"), ("path", "ascending"), ("record", "ascending")])
    uids = keys.column("uid").to_pylist()
    hashes = keys.column("hash").to_pylist()
    dropped: dict[str, str] = {}
    survivors: list[int] = []
    if cfg.exact:
        seen: set[str] = set()
        for i, h in enumerate(hashes):
            if h in seen:
                dropped[uids[i]] = EXACT_DUPLICATE
            else:
                seen.add(h)
                survivors.append(i)
    else:
        survivors = list(range(len(uids)))
    n_exact = len(dropped)
    if cfg.near and survivors:
        col = keys.column("minhash").combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False)
        offs = col.offsets.to_numpy()
        sigs = [flat[offs[i]:offs[i + 1]] for i in survivors]
        reps = near_duplicate_groups(sigs, cfg.threshold, cfg.num_perm)
        for j, rep in enumerate(reps):
            if rep != j:
                dropped[uids[survivors[j]]] = NEAR_DUPLICATE
    return DedupResult(dropped=dropped, docs_in=len(uids), exact_dropped=n_exact,
                       near_dropped=len(dropped) - n_exact)
