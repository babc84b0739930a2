"""Work units of the tokenize phase, planned from per-file counts: every kept document exactly once,
in order, cut on packing boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.tokenize_phase import TokenizePlan, cut_units, pool_size


@pytest.mark.parametrize("n_units", [1, 3, 8, 50])
@pytest.mark.parametrize("batch_docs", [1, 4, 64])
def test_units_cover_kept_docs_in_order_on_batch_boundaries(n_units: int, batch_docs: int) -> None:
    rng = np.random.default_rng(n_units * 100 + batch_docs)
    file_kept = rng.integers(0, 9, size=40)  # kept documents per staging file, some files none
    file_bytes = file_kept * rng.integers(1, 50_000, size=40)
    kept = int(file_kept.sum())
    units = cut_units(file_kept, file_bytes, n_units, batch_docs)
    assert 1 <= len(units) <= min(n_units, -(-kept // batch_docs))
    assert units[0][0] == 0 and units[-1][1] == kept  # every kept document once, in order
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(units, units[1:]))
    assert all(lo < hi for lo, hi in units)  # no empty unit
    # Every unit starts on a packing boundary, so packing never depends on the cut.
    assert all(lo % batch_docs == 0 for lo, _ in units)


@pytest.mark.parametrize("docs_per_file", [1, 100])
def test_units_shrink_toward_the_end_by_bytes(docs_per_file: int) -> None:
    """Cumulative bytes at the unit ends: 1 - (1 - u/4)^2 = 7/16, 12/16, 15/16, 1 of the total,
    whether the plan sees one document per file or 100 (bytes spread evenly within a file)."""
    n_files = 1600 // docs_per_file
    units = cut_units(np.full(n_files, docs_per_file), np.full(n_files, 10 * docs_per_file), 4, 10)
    assert [hi - lo for lo, hi in units] == [700, 500, 300, 100]
    # Bytes, not documents: the same cut where the first half of the documents are 3x larger.
    doc_bytes = np.where(np.arange(1600) < 800, 30, 10)
    units = cut_units(np.ones(1600, np.int64), doc_bytes, 4, 10)
    sizes = [int(doc_bytes[lo:hi].sum()) for lo, hi in units]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]
    assert abs(sizes[0] / sum(sizes) - 7 / 16) < 0.01


def test_units_never_empty_when_batches_are_fewer_or_uneven() -> None:
    """Fewer packing batches than units: one unit per batch. One huge batch first: the units that
    would fall inside it are left out, not handed to the pool empty (here: every cut falls in it)."""
    ones = np.ones(20, np.int64)  # 20 kept docs, one per staging file
    assert cut_units(ones, np.full(20, 10), 8, 5) == [(0, 5), (5, 10), (10, 15), (15, 20)]
    doc_bytes = np.where(np.arange(20) < 5, 10_000, 1)  # the first batch holds nearly all bytes
    assert cut_units(ones, doc_bytes, 8, 5) == [(0, 20)]


def test_no_kept_docs_gives_no_units() -> None:
    assert cut_units(np.zeros(3, np.int64), np.zeros(3, np.int64), 3, 8) == []


def test_pool_has_at_most_one_actor_per_unit(preprocess_cfg, tmp_path) -> None:
    cfg = preprocess_cfg(tmp_path / "out", "runtime.tokenize_actors=2")

    def plan(n: int) -> TokenizePlan:
        return TokenizePlan(tokenizer_path="", files=[], units=[(i, i + 1) for i in range(n)], dropped_dir="",
                            val_fraction=0.1, weights=[1.0], unit_dir="")

    assert pool_size(cfg, plan(1)) == 1 and pool_size(cfg, plan(7)) == 2
