"""Phase D of preprocessing: tokenize and pack kept documents in a Ray Data actor pool.

The actor pool is started *before* phase A, not after dedup: starting Ray Data actors costs
seconds (a worker process each, importing Ray Data, loading the tokenizer), which on a small
machine is a large share of the whole job. The pool's input is a fixed number of work units known
up front (from the input bytes); each actor waits on a `PlanBox` actor until the driver publishes
the `TokenizePlan` (which staging rows form each unit, the dedup decisions, the tokenizer), so the
actor start-up overlaps phases A to C. A run that fails before the plan publishes `None`, and the
pool drains with no output.

Packing boundaries are every `batch_docs` kept documents in global staging order, and units are
cut on those boundaries, so the output never depends on the number of actors or units.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import PreprocessConfig
from pipelines.data.pack import TokenizePack
from pipelines.data.split import split_batch

UNIT_BYTES = 32 << 20  # input bytes per work unit on large corpora (more units than actors balance the pool)
UNITS_PER_ACTOR = 16  # at least this many units per actor: small units keep every actor busy to the end
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


def unit_count(cfg: PreprocessConfig, input_bytes: int) -> int:
    return max(UNITS_PER_ACTOR * cfg.runtime.tokenize_actors, -(-input_bytes // UNIT_BYTES))


def cut_units(kept_rows: np.ndarray, kept_bytes: np.ndarray, n_units: int, batch_docs: int,
              total_rows: int) -> list[tuple[int, int]]:
    """Splits the kept documents (their global staging rows, in order) into `n_units` row ranges of
    about equal bytes, each starting on a packing boundary (a multiple of `batch_docs` kept docs)."""
    n_batches = -(-len(kept_rows) // batch_docs)
    batch_bytes = np.add.reduceat(kept_bytes, np.arange(0, len(kept_rows), batch_docs)) if n_batches else []
    cum = np.cumsum(batch_bytes)
    total = cum[-1] if n_batches else 0
    # First batch of each unit: where the cumulative bytes cross u/n of the total.
    starts = [0] + [int(np.searchsorted(cum, total * u / n_units, side="right")) for u in range(1, n_units)]
    starts = [min(s, n_batches) for s in starts] + [n_batches]
    units = []
    for u in range(n_units):
        b0, b1 = starts[u], max(starts[u], starts[u + 1])
        first = int(kept_rows[b0 * batch_docs]) if b0 < n_batches else total_rows
        last = int(kept_rows[b1 * batch_docs]) if b1 < n_batches else total_rows
        units.append((first, last))
    return units


class PlanBox:
    """A Ray actor holding the plan; `get` waits until the driver `put`s it (None: cancelled)."""

    def __init__(self) -> None:
        import asyncio

        self._ready = asyncio.Event()
        self._plan: TokenizePlan | None = None

    async def put(self, plan: TokenizePlan | None) -> None:
        self._plan = plan
        self._ready.set()

    async def get(self) -> TokenizePlan | None:
        await self._ready.wait()
        return self._plan


class TokenizeUnits:
    """Ray Data callable class: a unit index -> split + weights -> tokenize + pack, as packed tables.

    The actor reads its unit's staging rows itself, so the pool gets one small input per unit and
    every actor is busy. The tokenizer is loaded once per actor, when the plan arrives.
    """

    def __init__(self, box: list, seq_len: int, eos_token: str, pad_token: str, batch_docs: int) -> None:
        self.box = box[0]  # wrapped in a list so Ray passes the handle, not a resolved value
        self.seq_len, self.eos_token, self.pad_token, self.batch_docs = seq_len, eos_token, pad_token, batch_docs
        self.waited = False
        self.plan: TokenizePlan | None = None
        self.tp: TokenizePack | None = None
        self.starts: np.ndarray | None = None  # first global row of each staging file, then the total

    def _load(self) -> TokenizePlan | None:
        import ray

        if not self.waited:
            self.plan, self.waited = ray.get(self.box.get.remote()), True
            if self.plan is not None:
                self.tp = TokenizePack(self.plan.tokenizer_path, self.seq_len, self.eos_token, self.pad_token)
                self.starts = np.cumsum([0] + [n for _, n in self.plan.files], dtype=np.int64)
        return self.plan

    def _read(self, first: int, last: int) -> pa.Table | None:
        assert self.plan is not None and self.starts is not None
        parts = []
        for i, (path, _) in enumerate(self.plan.files):
            lo, hi = max(first, int(self.starts[i])), min(last, int(self.starts[i + 1]))
            if lo < hi:
                t = pq.read_table(path, columns=_DOC_COLUMNS)
                parts.append(t.slice(lo - int(self.starts[i]), hi - lo))
        return pa.concat_tables(parts) if parts else None

    def __call__(self, batch: pa.Table):
        plan = self._load()
        if plan is None:
            return
        for unit in batch.column("unit").to_pylist():
            table = self._read(*plan.units[unit])
            if table is None:
                continue
            docs = split_batch(table, plan.dropped, plan.val_fraction, plan.weights)
            for i in range(0, len(docs), self.batch_docs):
                packed = self.tp(docs.slice(i, self.batch_docs))
                if len(packed):
                    yield packed


class PackedStream:
    """Starts the phase D pool now and consumes its output in a thread with `consume(batches)`.

    `publish(plan)` releases the actors; `result()` waits for the consumer and returns its value
    (or raises its error). `cancel()` releases them with no work.
    """

    def __init__(self, cfg: PreprocessConfig, n_units: int, consume: Callable[[Any], Any]) -> None:
        import ray
        import ray.data

        self.box = ray.remote(num_cpus=0)(PlanBox).remote()
        ds = ray.data.from_arrow([pa.table({"unit": [u]}) for u in range(n_units)])
        ds = ds.map_batches(
            TokenizeUnits, batch_format="pyarrow", batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cfg.runtime.tokenize_actors),
            fn_constructor_kwargs={"box": [self.box], "seq_len": cfg.data.seq_len,
                                   "eos_token": cfg.tokenizer.eos_token, "pad_token": cfg.tokenizer.pad_token,
                                   "batch_docs": cfg.runtime.tokenize_batch_docs},
        )
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = consume(ds.iter_batches(batch_format="pyarrow", batch_size=None))
            except BaseException as e:  # handed to the caller of result()
                self._error = e

        self._thread = threading.Thread(target=run, name="preprocess-phase-d", daemon=True)
        self._thread.start()

    def publish(self, plan: TokenizePlan) -> None:
        import ray

        ray.get(self.box.put.remote(plan))

    def result(self) -> Any:
        self._finish()
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> None:
        import ray

        ray.get(self.box.put.remote(None))
        self._finish()

    def _finish(self) -> None:
        import ray

        self._thread.join()
        ray.kill(self.box)
