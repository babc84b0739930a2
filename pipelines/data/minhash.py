"""MinHash signatures of word shingles and LSH banding (the near-duplicate detector's math).

Hashes are stable across processes (CRC32 of words combined with a polynomial, then universal
hashing modulo the Mersenne prime 2**61-1), so signatures computed in any Ray worker agree.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

import numpy as np

_WORD_RE = re.compile(r"\w+")
_MERSENNE = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)
_POLY = np.uint64(1_000_003)
_CHUNK = 8192


@lru_cache(maxsize=8)
def _perms(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint64)
    return a[:, None], b[:, None]


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """Unique 32-bit hashes of the word k-shingles of `text` (one shingle if it has fewer than k words)."""
    words = _WORD_RE.findall(text)
    if not words:
        return np.zeros(0, dtype=np.uint64)
    h = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    k = min(k, len(h))
    n = len(h) - k + 1
    acc = h[:n].copy()
    with np.errstate(over="ignore"):
        for j in range(1, k):
            acc = acc * _POLY + h[j:j + n]
    acc = (acc >> np.uint64(32)) ^ (acc & _MASK32)
    return np.unique(acc)


def signature(text: str, num_perm: int, k: int, seed: int) -> np.ndarray:
    """(num_perm,) uint32 MinHash signature; empty when the text has no words."""
    s = shingle_hashes(text, k)
    if len(s) == 0:
        return np.zeros(0, dtype=np.uint32)
    a, b = _perms(num_perm, seed)
    sig = np.full(num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    for i in range(0, len(s), _CHUNK):
        chunk = s[i:i + _CHUNK][None, :]
        sig = np.minimum(sig, ((a * chunk + b) % _MERSENNE).min(axis=1))
    return (sig & _MASK32).astype(np.uint32)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing false positives + false negatives at `threshold`."""
    x = np.linspace(0.0, 1.0, 1001)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        r = num_perm // b
        if r == 0:
            break
        p = 1 - (1 - x ** r) ** b  # probability two docs of similarity x share a band
        fp = np.trapezoid(np.where(x < threshold, p, 0.0), x)
        fn = np.trapezoid(np.where(x >= threshold, 1 - p, 0.0), x)
        if fp + fn < best_err:
            best, best_err = (b, r), fp + fn
    return best


def near_duplicate_groups(sigs: list[np.ndarray], threshold: float, num_perm: int) -> list[int]:
    """Index of each signature's group representative (the lowest index in its group).

    Candidate pairs share an LSH band; a pair joins a group only when its estimated Jaccard
    similarity (fraction of equal signature entries) reaches `threshold`. Empty signatures
    stand alone.
    """
    bands, rows = lsh_params(threshold, num_perm)
    parent = list(range(len(sigs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for band in range(bands):
        buckets: dict[bytes, int] = {}
        lo, hi = band * rows, (band + 1) * rows
        for i, sig in enumerate(sigs):
            if len(sig) != num_perm:
                continue
            key = sig[lo:hi].tobytes()
            j = buckets.setdefault(key, i)
            if j == i:
                continue
            ri, rj = find(i), find(j)
            if ri != rj and float(np.mean(sig == sigs[j])) >= threshold:
                parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(len(sigs))]
