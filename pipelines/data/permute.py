"""A seeded pseudo-random permutation of [0, n) computed element by element (the train split's shuffle).

Any worker maps a global row index to its shuffled position without a table of n entries: a
4-round Feistel network over the smallest even number of bits that covers n, walked again on
values >= n (cycle walking), which keeps it a bijection of [0, n). Vectorized over numpy arrays.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _keys(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x5EED]).integers(0, 1 << 63, size=_ROUNDS, dtype=np.uint64)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + key) * _M1
        z ^= z >> np.uint64(31)
        z *= _M2
        return z ^ (z >> np.uint64(29))


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right, k) & mask)
    return (left << np.uint64(half)) | right


def permute(index: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The shuffled position in [0, n) of each of `index` (values in [0, n)); a bijection for fixed (n, seed)."""
    x = np.asarray(index, dtype=np.uint64).copy()
    if n <= 1:
        return x.astype(np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    keys = _keys(seed)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        x[todo] = _feistel(x[todo], half, keys)
        todo = x >= np.uint64(n)
    return x.astype(np.int64)
