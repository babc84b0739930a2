"""Deterministic train/validation split by document content hash, and per-source mixing weights.

A document's split depends only on its normalized content, so it never moves between splits when
the corpus grows. Weights apply to the train split: the integer part repeats a document, the
fractional part keeps one more copy for a hash-chosen share of documents (validation stays natural).
"""

from __future__ import annotations

import hashlib
import math

import pyarrow as pa

TRAIN, VAL = "train", "val"
SPLITS = (TRAIN, VAL)


def hash_unit(hex_hash: str, salt: str = "") -> float:
    """A hash -> [0, 1) deterministically."""
    if salt:
        hex_hash = hashlib.blake2b((salt + hex_hash).encode(), digest_size=8).hexdigest()
    return int(hex_hash[:16], 16) / float(1 << 64)


def assign_split(hex_hash: str, val_fraction: float) -> str:
    return VAL if hash_unit(hex_hash) < val_fraction else TRAIN


def repeats(hex_hash: str, weight: float, split: str) -> int:
    """How many copies of a document enter its split (weights affect only the train split)."""
    if split != TRAIN:
        return 1
    whole = math.floor(weight)
    return whole + (1 if hash_unit(hex_hash, "weight") < weight - whole else 0)


def split_batch(batch: pa.Table, dropped: frozenset[str] | set[str], val_fraction: float,
                weights: list[float]) -> pa.Table:
    """Keeps good, non-duplicate documents and adds `split` and `copies` (columns text, split, copies)."""
    keep, splits, copies = [], [], []
    for i, (src, uid, h, reason) in enumerate(zip(*(batch.column(c).to_pylist()
                                                    for c in ("source", "uid", "hash", "reason")))):
        if reason or uid in dropped:
            continue
        split = assign_split(h, val_fraction)
        c = repeats(h, weights[src], split)
        if c == 0:
            continue
        keep.append(i)
        splits.append(split)
        copies.append(c)
    texts = batch.column("text").take(pa.array(keep, pa.int64()))
    return pa.table({"text": texts, "split": pa.array(splits, pa.string()), "copies": pa.array(copies, pa.int32())})
