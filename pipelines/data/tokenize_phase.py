"""Phase D of preprocessing: tokenize and pack kept documents in a Ray Data actor pool.

The pool's input is one small row per work unit (a range of staging rows cut by bytes on packing
boundaries); each actor reads its unit's staged documents itself, applies the dedup decisions and
split weights from the `TokenizePlan`, and tokenizes with the tokenizer it loaded once. Output
streams back in unit order (`tokenize_and_pack`) for the driver to write.

The pool starts when phases A to C are done. An earlier version started it before phase A and
had the actors wait for the plan, to hide their start-up: on 2 cores that only moved the start-up
CPU into phase A, and Ray Data, which shares a cluster between datasets running at once, gave the
waiting pool half of the spare CPUs, so phase A ran one task at a time (measured: phase A 7.3-8.0 s
against 4.4-4.5 s alone, whole run 17.4-17.8 s against 16.2-16.4 s sequential).

Packing boundaries are every `batch_docs` kept documents in global staging order, and units are
cut on those boundaries, so the output never depends on the number of actors or units. The
staging files are read by path, so a multi-node cluster needs `data.output_dir` on shared storage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.pack import TokenizePack
from pipelines.data.split import split_batch

if TYPE_CHECKING:  # the actors import this module; they need no Hydra
    from pipelines.data.config import PreprocessConfig

UNIT_BYTES = 32 << 20  # bytes to tokenize per work unit on large corpora (more units than actors balance the pool)
UNITS_PER_ACTOR = 16  # at least this many units per actor: small units keep every actor busy to the end
# Units queued at each actor. Ray Data's default (2: one running, one waiting) left actors idle for
# 0.2-2.3 s whenever the driver, sharing the cores with the actors, was slow to see a unit finish and
# send the next (measured on the stdlib corpus; with 4, one gap of 0.27 s in two runs). The units
# shrink toward the end, so a deeper queue costs little balance at the tail.
TASKS_IN_FLIGHT_PER_ACTOR = 4
_DOC_COLUMNS = ["source", "uid", "hash", "reason", "text"]


@dataclass
class TokenizePlan:
    """What phase D needs from phases A-C. Rows are numbered over the staging files in order."""

    tokenizer_path: str
    files: list[tuple[str, int]]  # (staging Parquet path, rows)
    units: list[tuple[int, int]]  # [first global row, last global row + 1) of each unit
    dropped: set[str]  # uids removed by dedup
    val_fraction: float
    weights: list[float]


def unit_count(cfg: PreprocessConfig, n_bytes: int) -> int:
    return max(UNITS_PER_ACTOR * cfg.runtime.tokenize_actors, -(-n_bytes // UNIT_BYTES))


def cut_units(kept_rows: np.ndarray, kept_bytes: np.ndarray, n_units: int, batch_docs: int,
              total_rows: int) -> list[tuple[int, int]]:
    """Splits the kept documents (their global staging rows, in order) into at most `n_units` row
    ranges, each starting on a packing boundary (a multiple of `batch_docs` kept docs) and holding
    at least one packing batch.

    Units shrink toward the end (unit u ends where the cumulative bytes reach 1 - (1 - (u+1)/n)^2
    of the total): the pool takes units in order, so the last ones are small and every actor runs
    out of work at about the same time instead of one finishing a large unit alone. Where a cut
    would leave a unit empty (fewer batches than units, or one batch larger than a unit's share)
    the unit is left out: an empty unit still costs the pool a round trip, and the actor that drew
    it sat idle until the next one arrived (measured: 13 of 32 units empty on the stdlib corpus,
    0.8 s idle per actor)."""
    n_batches = -(-len(kept_rows) // batch_docs)
    if not n_batches:
        return []
    batch_bytes = np.add.reduceat(kept_bytes, np.arange(0, len(kept_rows), batch_docs))
    cum = np.cumsum(batch_bytes)
    # First batch of each unit: where the cumulative bytes cross the unit's start fraction.
    fractions = [1 - (1 - u / n_units) ** 2 for u in range(1, n_units)]
    starts = sorted({0, *(int(np.searchsorted(cum, cum[-1] * f, side="right")) for f in fractions)} - {n_batches})
    bounds = [*starts, n_batches]
    return [(int(kept_rows[b0 * batch_docs]), int(kept_rows[b1 * batch_docs]) if b1 < n_batches else total_rows)
            for b0, b1 in zip(bounds, bounds[1:])]


class TokenizeUnits:
    """Ray Data callable class: a unit index -> split + weights -> tokenize + pack, as packed tables.

    The actor reads its unit's staging rows itself, so the pool gets one small input per unit and
    every actor is busy. The tokenizer is loaded once per actor.
    """

    def __init__(self, plan: TokenizePlan, seq_len: int, eos_token: str, pad_token: str, batch_docs: int) -> None:
        self.plan, self.batch_docs = plan, batch_docs
        self.tp = TokenizePack(plan.tokenizer_path, seq_len, eos_token, pad_token)
        self.starts = np.cumsum([0] + [n for _, n in plan.files], dtype=np.int64)  # first row of each file, total

    def _read(self, first: int, last: int) -> pa.Table | None:
        parts = []
        for i, (path, _) in enumerate(self.plan.files):
            lo, hi = max(first, int(self.starts[i])), min(last, int(self.starts[i + 1]))
            if lo < hi:
                t = pq.read_table(path, columns=_DOC_COLUMNS)
                parts.append(t.slice(lo - int(self.starts[i]), hi - lo))
        return pa.concat_tables(parts) if parts else None

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        plan = self.plan
        for unit in batch.column("unit").to_pylist():
            table = self._read(*plan.units[unit])
            if table is None:
                continue
            docs = split_batch(table, plan.dropped, plan.val_fraction, plan.weights)
            for i in range(0, len(docs), self.batch_docs):
                packed = self.tp(docs.slice(i, self.batch_docs))
                if len(packed):
                    yield packed


def pool_size(cfg: PreprocessConfig, plan: TokenizePlan) -> int:
    """`runtime.tokenize_actors`, but never more actors than units: a small corpus (fewer packing
    batches than actors) would start an actor that gets no work, for about 1.1 CPU-s of start-up."""
    return min(cfg.runtime.tokenize_actors, len(plan.units))


def tokenize_and_pack(cfg: PreprocessConfig, plan: TokenizePlan) -> Iterator[pa.Table]:
    """Packed tables (columns of `TokenizePack`) of every unit, in unit order, from the actor pool."""
    import ray.data

    if not plan.units:
        return iter(())
    ds = ray.data.from_arrow([pa.table({"unit": [u]}) for u in range(len(plan.units))])
    ds = ds.map_batches(
        TokenizeUnits, batch_format="pyarrow", batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=pool_size(cfg, plan),
                                           max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR),
        fn_constructor_kwargs={"plan": plan, "seq_len": cfg.data.seq_len, "eos_token": cfg.tokenizer.eos_token,
                               "pad_token": cfg.tokenizer.pad_token, "batch_docs": cfg.runtime.tokenize_batch_docs},
    )
    return ds.iter_batches(batch_format="pyarrow", batch_size=None)
