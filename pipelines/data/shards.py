"""The output shards: packed sequences -> `<split>/part-NNNNN.parquet` with seq_id 0..N-1 per split.

The driver's end of phase D: packed tables arrive in order (columns of `pack.PACKED_SCHEMA`), each
split's rows go to its own `ShardWriter`, which rolls a new file every `rows_per_shard` sequences.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.data.split import SPLITS


class ShardWriter:
    """Rolls `<split>/part-NNNNN.parquet` files of `rows` sequences with seq_id 0..N-1."""

    SCHEMA = pa.schema([("seq_id", pa.int64()), ("tokens", pa.list_(pa.int32())),
                        ("loss_mask", pa.list_(pa.uint8()))])

    def __init__(self, d: Path, rows: int) -> None:
        self.d, self.rows = d, rows
        d.mkdir(parents=True, exist_ok=True)
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.sequences = 0
        self.tokens = 0
        self.shards: list[str] = []

    def add(self, t: pa.Table) -> None:
        self.tokens += int(pc.sum(t.column("n_tokens")).as_py() or 0)
        self.pending.append(t.select(["tokens", "loss_mask"]))
        self.n_pending += len(t)
        while self.n_pending >= self.rows:
            self._flush(self.rows)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self.pending).combine_chunks() if self.pending else self.SCHEMA.empty_table()
        head, rest = t.slice(0, n), t.slice(n)
        ids = pa.array(range(self.sequences, self.sequences + len(head)), pa.int64())
        name = f"part-{len(self.shards):05d}.parquet"
        pq.write_table(pa.table([ids, head.column("tokens"), head.column("loss_mask")], schema=self.SCHEMA),
                       self.d / name)
        self.shards.append(name)
        self.sequences += len(head)
        self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.n_pending or not self.shards:  # an empty split still gets one (empty) shard to read
            self._flush(self.n_pending)


class SplitShardWriter:
    """One `ShardWriter` per split under `out`; `add` routes each packed row to its split's writer."""

    def __init__(self, out: Path, rows_per_shard: int) -> None:
        self.writers = {s: ShardWriter(out / s, rows_per_shard) for s in SPLITS}

    def add(self, packed: pa.Table) -> None:
        for s in SPLITS:
            part = packed.filter(pc.equal(packed.column("split"), s))
            if len(part):
                self.writers[s].add(part)

    def close(self) -> dict[str, ShardWriter]:
        for w in self.writers.values():
            w.close()
        return self.writers


def write_shards(packed: Iterable[pa.Table], out: Path, rows_per_shard: int) -> dict[str, ShardWriter]:
    """Packed tables in order -> per-split shards with contiguous seq_ids; -> each split's writer."""
    writer = SplitShardWriter(out, rows_per_shard)
    for t in packed:
        writer.add(t)
    return writer.close()
