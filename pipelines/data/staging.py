"""The Parquet files the phases hand each other (staging documents, dedup keys), as Ray Data inputs.

Every pass over them starts from `path_blocks`: a few small blocks of file paths that the
workers open themselves (`read_paths` or a pass's own reader). `ray.data.read_parquet` would
do the same work, but its file listing runs as a separate task before any reading: measured on
8 files of 128 rows on the loaded 2-core machine, 7.7-17.1 s per read against 0.06-0.13 s from a
block of paths (the dedup phase read three times that way). The driver holds one small block per
group of files, never the rows. The module imports only pyarrow, so the workers that run these
functions import no more (a task defined in `pipeline` would import torch, through Ray's setup).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

FILES_PER_BLOCK = 8  # paths per input block (more when that would give more than MAX_BLOCKS)
# A sort-based shuffle of M blocks moves M x M pieces: a corpus of many staging files (128 rows
# each) is read in at most this many blocks. Larger ones are split by Ray Data's block size.
MAX_BLOCKS = 256


def path_blocks(paths: list[str]) -> list[pa.Table]:
    """`paths` in order as blocks of one `path` column, `FILES_PER_BLOCK` each (or more, to stay at
    `MAX_BLOCKS` blocks)."""
    n = max(FILES_PER_BLOCK, -(-len(paths) // MAX_BLOCKS))
    return [pa.table({"path": pa.array(paths[i:i + n], pa.string())}) for i in range(0, len(paths), n)]


def read_paths(batch: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """Ray Data UDF: a block of paths -> their rows (`columns`, default all), in path order."""
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in batch.column("path").to_pylist()])


QUARANTINE_COLUMNS = ["source", "path", "record", "reason", "excerpt"]


def write_bad_records(files: list[str], reasons: list[str], head: list[dict], out: str) -> int:
    """Ray task: the records of `head`, then every staged record of `files` whose reason is one of
    `reasons` (in file order) -> `out` as JSON lines; -> how many."""
    n = 0
    with open(out, "w") as fh:
        for row in head:
            fh.write(json.dumps(row) + "\n")
            n += 1
        if not files:
            return n
        dataset = pads.dataset(files, format="parquet")
        for batch in dataset.to_batches(columns=QUARANTINE_COLUMNS, filter=pc.field("reason").isin(reasons)):
            for row in batch.to_pylist():
                fh.write(json.dumps(row) + "\n")
                n += 1
    return n
