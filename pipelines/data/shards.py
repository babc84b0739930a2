"""The output shards: `<split>/part-NNNNN.parquet` of `rows_per_shard` sequences, seq_id 0..N-1 per split.

Written by Ray tasks, never streamed through the driver. The tokenizer actors leave one packed
file per work unit (`unit-UUUUU.arrow`, rows in packing order; uncompressed Arrow IPC, which the
shard tasks memory-map: about 10x less CPU to write and read than Parquet, and the files are
removed when the shards are written) and report its rows per split;
from those per-unit counts the driver plans each shard as pieces (unit, first row, last row) and
a task per shard reads its pieces and writes the file with its seq_ids. In order, shard k holds
sequences k*R .. (k+1)*R-1 of the split in packing order. With `shuffle.enabled` the train split's
sequence at packing position g gets seq_id `permute(g)` instead, so reading the shards in seq_id
order sees the corpus mixed: the rows move to their shard through a Ray Data shuffle grouped by
shard number, and each shard task sorts its rows by seq_id.

Same config and input, same files byte for byte (no timestamps in the files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq

from pipelines.data.pack import PACKED_SCHEMA
from pipelines.data.permute import permute

SCHEMA = pa.schema([("seq_id", pa.int64()), ("tokens", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.uint8()))])
Piece = tuple[int, int, int]  # (unit, first row, last row + 1) within the unit's rows of one split


@dataclass
class SplitOutput:
    """What one split's shards hold (for the manifest)."""

    sequences: int = 0
    tokens: int = 0
    shards: list[str] = field(default_factory=list)


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def unit_file(unit_dir: str | Path, unit: int) -> str:
    return str(Path(unit_dir) / f"unit-{unit:05d}.arrow")


def write_unit(rows: pa.Table, unit_dir: str | Path, unit: int) -> None:
    """One unit's packed rows (PACKED_SCHEMA) -> its unit file."""
    feather.write_feather(rows, unit_file(unit_dir, unit), compression="uncompressed")


def write_shard_file(rows: pa.Table, first_seq_id: int, path: str | Path) -> None:
    """`rows` (columns tokens, loss_mask, ...) as one shard with seq_ids first_seq_id, first_seq_id+1, ..."""
    ids = pa.array(np.arange(first_seq_id, first_seq_id + len(rows), dtype=np.int64))
    pq.write_table(pa.table([ids, rows.column("tokens"), rows.column("loss_mask")], schema=SCHEMA), str(path))


def plan_shards(unit_rows: list[int], rows_per_shard: int) -> list[list[Piece]]:
    """Per shard, the unit row ranges it is made of, for units holding `unit_rows` rows of a split in order.

    A split with no rows still gets one (empty) shard, so training finds a file to read."""
    total = sum(unit_rows)
    starts = np.cumsum([0, *unit_rows])
    shards: list[list[Piece]] = []
    for lo in range(0, max(total, 1), rows_per_shard):
        hi = min(lo + rows_per_shard, total)
        shards.append([(u, max(lo, int(starts[u])) - int(starts[u]), min(hi, int(starts[u + 1])) - int(starts[u]))
                       for u in range(len(unit_rows)) if starts[u] < hi and starts[u + 1] > lo])
    return shards


def read_unit(unit_dir: str, unit: int, split: str) -> pa.Table:
    """One unit's packed rows of `split`, in packing order."""
    t = feather.read_table(unit_file(unit_dir, unit), memory_map=True)
    return t.filter(pc.equal(t.column("split"), split))


def write_planned_shard(unit_dir: str, split: str, pieces: list[Piece], first_seq_id: int, path: str) -> int:
    """Ray task: the shard made of `pieces` -> `path`; -> its real tokens."""
    parts = [read_unit(unit_dir, u, split).slice(lo, hi - lo) for u, lo, hi in pieces]
    rows = pa.concat_tables(parts) if parts else PACKED_SCHEMA.empty_table()
    write_shard_file(rows, first_seq_id, path)
    return int(pc.sum(rows.column("n_tokens")).as_py() or 0)


def write_in_order(unit_dir: str, split: str, unit_rows: list[int], rows_per_shard: int, out: Path) -> SplitOutput:
    """Shards of `split` in packing order, one Ray task each."""
    import ray

    out.mkdir(parents=True, exist_ok=True)
    task = ray.remote(write_planned_shard)
    plans = plan_shards(unit_rows, rows_per_shard)
    names = [shard_name(k) for k in range(len(plans))]
    tokens = ray.get([task.remote(unit_dir, split, pieces, k * rows_per_shard, str(out / names[k]))
                      for k, pieces in enumerate(plans)])
    return SplitOutput(sequences=sum(unit_rows), tokens=sum(tokens), shards=names)


def shuffled_rows(batch: pa.Table, unit_dir: str, split: str, n: int, seed: int, rows_per_shard: int
                  ) -> pa.Table:
    """Ray Data UDF: (unit, offset) rows -> that unit's rows with `seq_id` = permute(offset + i) and `shard`."""
    parts = []
    for unit, offset in zip(batch.column("unit").to_pylist(), batch.column("offset").to_pylist()):
        t = read_unit(unit_dir, unit, split)
        seq = permute(np.arange(offset, offset + len(t)), n, seed)
        parts.append(pa.table({"seq_id": seq, "shard": seq // rows_per_shard, "tokens": t.column("tokens"),
                               "loss_mask": t.column("loss_mask"), "n_tokens": t.column("n_tokens")}))
    return pa.concat_tables(parts)


def write_shuffled_group(group: pa.Table, out: str, rows_per_shard: int) -> pa.Table:
    """Ray Data UDF: every row of one shard -> the shard file, sorted by seq_id; -> (shard, tokens)."""
    group = group.sort_by("seq_id")
    k = int(group.column("shard")[0].as_py())
    if group.column("seq_id").to_numpy()[0] != k * rows_per_shard:
        raise AssertionError(f"shard {k} does not start at seq_id {k * rows_per_shard}")
    write_shard_file(group, k * rows_per_shard, Path(out) / shard_name(k))
    return pa.table({"shard": [k], "tokens": [int(pc.sum(group.column("n_tokens")).as_py() or 0)]})


def write_shuffled(unit_dir: str, split: str, unit_rows: list[int], rows_per_shard: int, seed: int, out: Path
                   ) -> SplitOutput:
    """Shards of `split` in the seeded shuffled order (`permute`), through a Ray Data shuffle by shard."""
    import ray.data

    n = sum(unit_rows)
    if n == 0:
        return write_in_order(unit_dir, split, unit_rows, rows_per_shard, out)
    out.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0, *unit_rows])[:-1]
    units = [pa.table({"unit": [u], "offset": [int(offsets[u])]}) for u in range(len(unit_rows)) if unit_rows[u]]
    done = (ray.data.from_arrow(units)
            .map_batches(shuffled_rows, batch_format="pyarrow", batch_size=1,
                         fn_kwargs={"unit_dir": unit_dir, "split": split, "n": n, "seed": seed,
                                    "rows_per_shard": rows_per_shard})
            .groupby("shard").map_groups(write_shuffled_group, batch_format="pyarrow",
                                         fn_kwargs={"out": str(out), "rows_per_shard": rows_per_shard}))
    tokens = sum(int(t) for b in done.iter_batches(batch_format="pyarrow", batch_size=None)
                 for t in b.column("tokens").to_pylist())
    return SplitOutput(sequences=n, tokens=tokens, shards=[shard_name(k) for k in range(-(-n // rows_per_shard))])
