"""Work units of the tokenize phase: every kept document exactly once, in order, cut on packing boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.tokenize_phase import TokenizePlan, cut_units, pool_size


def _covered(units: list[tuple[int, int]], kept_rows: np.ndarray) -> list[list[int]]:
    return [[int(r) for r in kept_rows if lo <= r < hi] for lo, hi in units]


@pytest.mark.parametrize("n_units", [1, 3, 8, 50])
@pytest.mark.parametrize("batch_docs", [1, 4, 64])
def test_units_cover_kept_rows_in_order_on_batch_boundaries(n_units: int, batch_docs: int) -> None:
    rng = np.random.default_rng(n_units * 100 + batch_docs)
    total_rows = 300
    kept_rows = np.sort(rng.choice(total_rows, size=170, replace=False))
    kept_bytes = rng.integers(1, 50_000, size=len(kept_rows))
    units = cut_units(kept_rows, kept_bytes, n_units, batch_docs, total_rows)
    assert 1 <= len(units) <= min(n_units, -(-len(kept_rows) // batch_docs))
    per_unit = _covered(units, kept_rows)
    assert all(per_unit)  # no empty unit
    assert [r for rows in per_unit for r in rows] == kept_rows.tolist()  # all, once, in order
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(units, units[1:]))  # ranges do not overlap
    # Every unit but the last holds whole packing batches, so packing never depends on the cut.
    assert all(len(rows) % batch_docs == 0 for rows in per_unit[:-1] if rows)


def test_units_shrink_toward_the_end_by_bytes() -> None:
    """Cumulative bytes at the unit ends: 1 - (1 - u/4)^2 = 7/16, 12/16, 15/16, 1 of the total."""
    kept_rows = np.arange(1600)
    kept_bytes = np.full(1600, 10)
    units = cut_units(kept_rows, kept_bytes, 4, 10, 1600)
    assert [hi - lo for lo, hi in units] == [700, 500, 300, 100]
    # Bytes, not documents: the same cut where the first half of the documents are 3x larger.
    kept_bytes = np.where(kept_rows < 800, 30, 10)
    units = cut_units(kept_rows, kept_bytes, 4, 10, 1600)
    sizes = [int(kept_bytes[lo:hi].sum()) for lo, hi in units]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]
    assert abs(sizes[0] / sum(sizes) - 7 / 16) < 0.01


def test_units_never_empty_when_batches_are_fewer_or_uneven() -> None:
    """Fewer packing batches than units: one unit per batch. One huge batch first: the units that
    would fall inside it are left out, not handed to the pool empty (here: every cut falls in it)."""
    kept_rows = np.arange(0, 40, 2)  # 20 kept docs, every other staging row
    units = cut_units(kept_rows, np.full(20, 10), 8, 5, 41)
    assert units == [(0, 10), (10, 20), (20, 30), (30, 41)]
    kept_bytes = np.where(kept_rows < 10, 10_000, 1)  # the first batch holds nearly all bytes
    units = cut_units(kept_rows, kept_bytes, 8, 5, 41)
    assert units == [(0, 41)]


def test_no_kept_rows_gives_no_units() -> None:
    assert cut_units(np.zeros(0, np.int64), np.zeros(0, np.int64), 3, 8, 12) == []


def test_pool_has_at_most_one_actor_per_unit(preprocess_cfg, tmp_path) -> None:
    cfg = preprocess_cfg(tmp_path / "out", "runtime.tokenize_actors=2")

    def plan(n: int) -> TokenizePlan:
        return TokenizePlan(tokenizer_path="", files=[], units=[(i, i + 1) for i in range(n)], dropped=set(),
                            val_fraction=0.1, weights=[1.0])

    assert pool_size(cfg, plan(1)) == 1 and pool_size(cfg, plan(7)) == 2
