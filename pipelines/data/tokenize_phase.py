"""Phase D of preprocessing: tokenize and pack kept documents in a pool of Ray actors.

The pool's input is one unit index per work unit (a range of kept documents cut by bytes on
packing boundaries); each actor reads its unit's staged documents itself, applies the dedup
decisions and split weights, tokenizes with the tokenizer it loaded once, and writes the unit's
packed rows to its own file (`shards.unit_file`). Only one row of counts per unit comes back to
the driver, which plans the shards from them (`shards`). The actors are plain Ray actors that the
driver feeds with `ray.wait` (`tokenize_and_pack`); with a Ray Data actor pool (the earlier
version) the driver ran Ray Data's streaming executor for the whole phase and the actors ran
Ray Data's map worker around each unit.

The pool starts when phases A to C are done. An earlier version started it before phase A and
had the actors wait for the plan, to hide their start-up: on 2 cores that only moved the start-up
CPU into phase A, and Ray Data, which shares a cluster between datasets running at once, gave the
waiting pool half of the spare CPUs, so phase A ran one task at a time (measured: phase A 7.3-8.0 s
against 4.4-4.5 s alone, whole run 17.4-17.8 s against 16.2-16.4 s sequential).

Packing boundaries are every `batch_docs` kept documents in global staging order, and units are
cut on those boundaries, so the output never depends on the number of actors or units. The plan
holds per-file numbers only (kept documents and bytes of each staging file). The staging and unit
files are read by path, so a multi-node cluster needs `data.output_dir` on shared storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.data.dedup_cluster import load_dropped
from pipelines.data.pack import TokenizePack
from pipelines.data.shards import write_unit
from pipelines.data.split import SPLITS, split_batch

if TYPE_CHECKING:  # the actors import this module; they need no Hydra
    from pipelines.data.config import PreprocessConfig

UNIT_BYTES = 32 << 20  # bytes to tokenize per work unit on large corpora (more units than actors balance the pool)
UNITS_PER_ACTOR = 16  # at least this many units per actor: small units keep every actor busy to the end
# Units queued at each actor. Two (one running, one waiting: Ray Data's default when the pool was a
# Ray Data actor pool) left actors idle for 0.2-2.3 s whenever the driver, sharing the cores with
# the actors, was slow to see a unit finish and send the next (measured on the stdlib corpus; with
# 4, one gap of 0.27 s in two runs). The units
# shrink toward the end, so a deeper queue costs little balance at the tail.
TASKS_IN_FLIGHT_PER_ACTOR = 4
_DOC_COLUMNS = ["source", "uid", "hash", "reason", "text"]


@dataclass
class TokenizePlan:
    """What phase D needs from phases A-C: per staging file, never per document. Kept documents
    (good, not dropped by dedup, at least one copy) are numbered 0..K-1 over the files in order."""

    tokenizer_path: str
    files: list[tuple[str, int]]  # (staging Parquet path, kept documents in it)
    units: list[tuple[int, int]]  # [first kept doc, last kept doc + 1) of each unit
    dropped_dir: str  # dedup's decisions (`dedup_cluster.load_dropped`)
    val_fraction: float
    weights: list[float]
    unit_dir: str  # where each unit's packed rows go (`shards.unit_file`)


def unit_count(cfg: PreprocessConfig, n_bytes: int) -> int:
    return max(UNITS_PER_ACTOR * cfg.runtime.tokenize_actors, -(-n_bytes // UNIT_BYTES))


def cut_units(file_kept: np.ndarray, file_bytes: np.ndarray, n_units: int, batch_docs: int) -> list[tuple[int, int]]:
    """Splits the K kept documents (`file_kept` of them in each staging file, `file_bytes` their
    bytes times their repeats) into at most `n_units` ranges of kept-document numbers, each
    starting on a packing boundary (a multiple of `batch_docs`) and holding at least one batch.

    Units shrink toward the end (unit u ends where the cumulative bytes reach 1 - (1 - (u+1)/n)^2
    of the total): the pool takes units in order, so the last ones are small and every actor runs
    out of work at about the same time instead of one finishing a large unit alone. Within a file
    the bytes count as spread evenly over its documents (the plan holds per-file numbers only).
    Where a cut would leave a unit empty (fewer batches than units, or one batch larger than a
    unit's share) the unit is left out: an empty unit still costs the pool a round trip, and the
    actor that drew it sat idle until the next one arrived (measured: 13 of 32 units empty on the
    stdlib corpus, 0.8 s idle per actor)."""
    kept = int(np.sum(file_kept))
    n_batches = -(-kept // batch_docs)
    if not n_batches:
        return []
    doc_end = np.cumsum(file_kept, dtype=np.float64)
    byte_end = np.cumsum(file_bytes, dtype=np.float64)
    starts = {0}
    for u in range(1, n_units):
        target = byte_end[-1] * (1 - (1 - u / n_units) ** 2)
        f = int(np.searchsorted(byte_end, target, side="right"))  # the file whose bytes cross the target
        if f >= len(file_kept):
            continue
        doc0, byte0 = doc_end[f] - file_kept[f], byte_end[f] - file_bytes[f]
        doc = doc0 + (file_kept[f] * (target - byte0) / file_bytes[f] if file_bytes[f] else 0)
        starts.add(int(doc // batch_docs))
    bounds = [*sorted(starts - {n_batches}), n_batches]
    return [(b0 * batch_docs, min(b1 * batch_docs, kept)) for b0, b1 in zip(bounds, bounds[1:])]


class TokenizeUnits:
    """The tokenizer actor: a unit index -> split + weights -> tokenize + pack -> the unit's packed
    file; -> the unit's counts (rows and tokens per split).

    The actor reads its unit's staged documents itself, so the pool gets one small input per unit
    and every actor is busy. The tokenizer and the dedup decisions are loaded once per actor.
    """

    def __init__(self, plan: TokenizePlan, seq_len: int, eos_token: str, pad_token: str, batch_docs: int) -> None:
        self.plan, self.batch_docs = plan, batch_docs
        self.tp = TokenizePack(plan.tokenizer_path, seq_len, eos_token, pad_token)
        self.dropped = load_dropped(plan.dropped_dir)
        self.starts = np.cumsum([0] + [n for _, n in plan.files], dtype=np.int64)  # first kept doc of each file

    def _read(self, first: int, last: int) -> pa.Table:
        """Kept documents first..last-1 (columns text, split, copies)."""
        plan, parts = self.plan, []
        for i, (path, _) in enumerate(plan.files):
            lo, hi = max(first, int(self.starts[i])), min(last, int(self.starts[i + 1]))
            if lo < hi:
                docs = split_batch(pq.read_table(path, columns=_DOC_COLUMNS), self.dropped, plan.val_fraction,
                                   plan.weights)
                parts.append(docs.slice(lo - int(self.starts[i]), hi - lo))
        return pa.concat_tables(parts)

    def unit(self, unit: int) -> dict[str, int]:
        """Work unit `unit` -> its packed file; -> its counts (`unit`, `<split>_rows`, `<split>_tokens`)."""
        docs = self._read(*self.plan.units[unit])
        packed = [self.tp(docs.slice(i, self.batch_docs)) for i in range(0, len(docs), self.batch_docs)]
        table = pa.concat_tables(packed)
        write_unit(table, self.plan.unit_dir, unit)
        counts = {"unit": unit}
        for split in SPLITS:
            part = table.filter(pc.equal(table.column("split"), split))
            counts[f"{split}_rows"] = len(part)
            counts[f"{split}_tokens"] = int(pc.sum(part.column("n_tokens")).as_py() or 0)
        return counts


def pool_size(cfg: PreprocessConfig, plan: TokenizePlan) -> int:
    """`runtime.tokenize_actors`, but never more actors than units: a small corpus (fewer packing
    batches than actors) would start an actor that gets no work, for about 1.1 CPU-s of start-up."""
    return min(cfg.runtime.tokenize_actors, len(plan.units))


def tokenize_and_pack(cfg: PreprocessConfig, plan: TokenizePlan) -> list[dict[str, int]]:
    """Every unit tokenized, packed and written by the actor pool; -> per unit, in unit order, its
    rows and tokens per split (`<split>_rows`, `<split>_tokens`).

    Plain Ray actors fed by `ray.wait`: each actor has up to `TASKS_IN_FLIGHT_PER_ACTOR` units
    queued and gets the next unit when one of its units finishes. The driver sleeps in `ray.wait`
    meanwhile (a Ray Data actor pool ran its streaming executor in the driver for the whole phase)."""
    import ray

    if not plan.units:
        return []
    Path(plan.unit_dir).mkdir(parents=True, exist_ok=True)
    actor_cls = ray.remote(num_cpus=1)(TokenizeUnits)
    actors = [actor_cls.remote(plan, cfg.data.seq_len, cfg.tokenizer.eos_token, cfg.tokenizer.pad_token,
                               cfg.runtime.tokenize_batch_docs) for _ in range(pool_size(cfg, plan))]
    todo = iter(range(len(plan.units)))
    pending: dict = {}  # ObjectRef of a unit's counts -> the actor running it

    def submit(actor) -> None:  # noqa: ANN001 (a Ray actor handle)
        unit = next(todo, None)
        if unit is not None:
            pending[actor.unit.remote(unit)] = actor

    try:
        for _ in range(TASKS_IN_FLIGHT_PER_ACTOR):  # round-robin, so every actor starts on a unit
            for actor in actors:
                submit(actor)
        counts = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done[0])
            counts.append(ray.get(done[0]))
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return sorted(counts, key=lambda c: c["unit"])
