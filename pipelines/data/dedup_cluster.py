"""Exact and near-duplicate removal as Ray Data operations (phase B), with no per-document state on the driver.

  exact  staged keys of good documents -> group by content `hash` -> in each group the first
         document in (source, path, record) order survives, the others are `exact_duplicate`;
         every good document is written to `keys/` with its decision (column `dup`).
  near   survivors with a full MinHash -> one row per LSH band (bucket = band index + the band's
         values) -> group by bucket -> in each bucket the first document in (source, path,
         record) order is compared with every other member; a pair at or above `threshold` is
         an edge (written to `edges/`).
  Grouping is a sort by the key (Ray Data's sort-based shuffle puts equal keys in one block)
  followed by one vectorized call per sorted block, which is how Ray Data's `map_groups` runs
  too, minus its Python call per group (`mark_exact`, `bucket_edges`).
  resolve  one Ray task unions the edges; in each connected group every document but the first
         in (source, path, record) order is `near_duplicate`.

The dropped documents (uid, reason) end up under `dropped/`, which the later phases load on the
workers (`load_dropped`). The result equals `dedup.decide` (the driver-side reference, which keeps
everything in one process): the same first-in-order rule, the same candidates (a document and the
first member of each band bucket it falls in) and the same similarity test, so the same groups
(tested on the fixtures and the default corpus). What stays on one machine: the resolve task holds
the edges (near-duplicate pairs, about 100 bytes each), never the documents.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.data.dedup import EXACT_DUPLICATE, NEAR_DUPLICATE
from pipelines.data.minhash import lsh_params
from pipelines.data.staging import path_blocks, read_paths

if TYPE_CHECKING:  # Ray workers import this module; they need no Hydra
    from pipelines.data.config import DedupConfig

ORDER = [("source", "ascending"), ("path", "ascending"), ("record", "ascending")]
KEY_COLUMNS = ["source", "path", "record", "reason", "uid", "hash", "minhash"]
DROPPED_DIR = "dropped"
_EDGE_SCHEMA = pa.schema([("a_source", pa.int32()), ("a_path", pa.string()), ("a_record", pa.int64()),
                          ("a_uid", pa.string()), ("b_source", pa.int32()), ("b_path", pa.string()),
                          ("b_record", pa.int64()), ("b_uid", pa.string())])
_DROPPED_SCHEMA = pa.schema([("uid", pa.string()), ("reason", pa.string())])


def good_keys(batch: pa.Table) -> pa.Table:
    """The key columns of the records that passed reading and the filters."""
    return batch.filter(pc.equal(batch.column("reason"), "")).drop_columns(["reason"])


def mark_exact(block: pa.Table) -> pa.Table:
    """Rows of whole content-hash groups -> the same rows with `dup`: "" for the first of each group
    in (source, path, record) order, else exact_duplicate. Vectorized over the groups of a block
    (one Python call per block, not per group: per-group calls cost the workers about 1 CPU-s per
    800 documents); a single group is the one-group case."""
    block = block.sort_by([("hash", "ascending"), *ORDER])
    first = _group_starts(block.column("hash"))
    dup = np.where(first, "", EXACT_DUPLICATE)
    return block.append_column("dup", pa.array(dup, pa.string()))


def _group_starts(key: pa.ChunkedArray) -> np.ndarray:
    """For a column sorted by `key`: True where a row starts a new group of equal keys."""
    n = len(key)
    if n == 0:
        return np.zeros(0, bool)
    key = key.combine_chunks()
    changed = pc.not_equal(key.slice(1), key.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return np.concatenate([[True], changed])


def no_exact(batch: pa.Table) -> pa.Table:
    """Exact dedup off: every good document survives it."""
    return batch.append_column("dup", pa.array([""] * len(batch), pa.string()))


def band_rows(batch: pa.Table, num_perm: int, bands: int, rows: int) -> pa.Table:
    """Survivors with a full signature -> one row per (document, band): `bucket` names band and values."""
    batch = batch.filter(pc.and_(pc.equal(batch.column("dup"), ""),
                                 pc.equal(pc.list_value_length(batch.column("minhash")), num_perm)))
    n = len(batch)
    sig_ND = batch.column("minhash").combine_chunks().flatten().to_numpy().reshape(n, num_perm)
    keys = [f"{b}:{sig_ND[i, b * rows:(b + 1) * rows].tobytes().hex()}" for i in range(n) for b in range(bands)]
    take = pa.array(np.repeat(np.arange(n), bands), pa.int64())
    out = batch.select(["source", "path", "record", "uid", "minhash"]).take(take)
    return out.append_column("bucket", pa.array(keys, pa.string()))


def bucket_edges(block: pa.Table, threshold: float, num_perm: int) -> pa.Table:
    """Rows of whole LSH buckets -> edges (first member in order, other member) whose signatures
    agree on at least `threshold` of their entries, bucket by bucket. Vectorized over the buckets
    of a block, like `mark_exact`; a single bucket is the one-group case."""
    if len(block) < 2:
        return _EDGE_SCHEMA.empty_table()
    block = block.sort_by([("bucket", "ascending"), *ORDER])
    starts = _group_starts(block.column("bucket"))
    idx = np.arange(len(block))
    first_N = np.maximum.accumulate(np.where(starts, idx, 0))  # each row's bucket's first row
    members = idx[~starts]
    if not len(members):
        return _EDGE_SCHEMA.empty_table()
    sig_ND = block.column("minhash").combine_chunks().flatten().to_numpy().reshape(len(block), num_perm)
    sim_M = (sig_ND[members] == sig_ND[first_N[members]]).mean(axis=1)
    others = members[sim_M >= threshold]
    if not len(others):
        return _EDGE_SCHEMA.empty_table()
    first = block.take(pa.array(first_N[others], pa.int64()))
    rest = block.take(pa.array(others, pa.int64()))
    cols = [first.column(c) for c in ("source", "path", "record", "uid")]
    cols += [rest.column(c) for c in ("source", "path", "record", "uid")]
    return pa.table(cols, schema=_EDGE_SCHEMA)


def resolve_edges(edges: pa.Table) -> pa.Table:
    """Union the edges; in each connected group all but the first document in order are near duplicates."""
    if not len(edges):
        return _DROPPED_SCHEMA.empty_table()
    order: dict[str, tuple] = {}
    parent: dict[str, str] = {}
    cols = {c: edges.column(c).to_pylist() for c in edges.column_names}
    for side in ("a", "b"):
        for s, p, r, u in zip(*(cols[f"{side}_{c}"] for c in ("source", "path", "record", "uid"))):
            order[u] = (s, p.encode(), r)  # UTF-8 bytes: the order pyarrow's sort uses
            parent[u] = u

    def find(u: str) -> str:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for a, b in zip(cols["a_uid"], cols["b_uid"]):
        ra, rb = find(a), find(b)
        if ra != rb:
            first, second = (ra, rb) if order[ra] < order[rb] else (rb, ra)
            parent[second] = first
    near = sorted(u for u in parent if find(u) != u)
    return pa.table({"uid": near, "reason": [NEAR_DUPLICATE] * len(near)}, schema=_DROPPED_SCHEMA)


def _resolve_task(edge_dir: str, out: str) -> int:
    files = sorted(Path(edge_dir).glob("*.parquet"))
    edges = pa.concat_tables([pq.read_table(f, schema=_EDGE_SCHEMA) for f in files]) if files else \
        _EDGE_SCHEMA.empty_table()
    near = resolve_edges(edges)
    pq.write_table(near, out)
    return len(near)


def exact_dropped(batch: pa.Table) -> pa.Table:
    """Marked keys -> (uid, reason) of the exact duplicates among them."""
    batch = batch.filter(pc.equal(batch.column("dup"), EXACT_DUPLICATE))
    return pa.table([batch.column("uid"), batch.column("dup")], schema=_DROPPED_SCHEMA)


def run_dedup(staging: list[str], cfg: DedupConfig, work: Path) -> Path:
    """Phase B over the staging Parquet files, into `work` (keys/, edges/, dropped/); -> dropped/."""
    import ray
    import ray.data

    dropped = work / DROPPED_DIR
    dropped.mkdir(parents=True, exist_ok=True)
    if not (cfg.exact or cfg.near) or not staging:
        return dropped
    keys = (ray.data.from_arrow(path_blocks(staging))
            .map_batches(read_paths, batch_format="pyarrow", batch_size=None, fn_kwargs={"columns": KEY_COLUMNS})
            .map_batches(good_keys, batch_format="pyarrow", batch_size=None))
    if cfg.exact:
        keys = keys.sort("hash").map_batches(mark_exact, batch_format="pyarrow", batch_size=None)
    else:
        keys = keys.map_batches(no_exact, batch_format="pyarrow", batch_size=None)
    keys.write_parquet(str(work / "keys"))
    key_files = sorted(str(f) for f in (work / "keys").glob("*.parquet"))
    if not key_files:  # no good document: nothing to decide
        return dropped
    marked = ray.data.from_arrow(path_blocks(key_files)).map_batches(read_paths, batch_format="pyarrow",
                                                                      batch_size=None)
    if cfg.exact:
        marked.map_batches(exact_dropped, batch_format="pyarrow", batch_size=None).write_parquet(str(dropped))
    if cfg.near:
        bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
        (marked.map_batches(band_rows, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"num_perm": cfg.num_perm, "bands": bands, "rows": rows})
         .sort("bucket").map_batches(bucket_edges, batch_format="pyarrow", batch_size=None,
                                     fn_kwargs={"threshold": cfg.threshold, "num_perm": cfg.num_perm})
         .write_parquet(str(work / "edges")))
        ray.get(ray.remote(_resolve_task).remote(str(work / "edges"), str(dropped / "near.parquet")))
    return dropped


def load_dropped(dropped_dir: str) -> dict[str, str]:
    """uid -> exact_duplicate | near_duplicate, read once per process (workers of the later phases)
    for each version of the directory (its files' names, sizes and mtimes)."""
    files = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(dropped_dir).glob("*.parquet")))
    return _read_dropped(files)


@lru_cache(maxsize=4)
def _read_dropped(files: tuple[tuple[str, int, int], ...]) -> dict[str, str]:
    if not files:
        return {}
    t = pa.concat_tables([pq.read_table(f, schema=_DROPPED_SCHEMA) for f, _, _ in files])
    return dict(zip(t.column("uid").to_pylist(), t.column("reason").to_pylist()))


def decisions_digest(dropped: dict[str, str]) -> str:
    """One hash of a dedup decision (uid -> reason), to compare two runs' kept sets."""
    import hashlib

    return hashlib.sha256("\n".join(f"{u}:{r}" for u, r in sorted(dropped.items())).encode()).hexdigest()


def digest_dir(dropped_dir: str) -> str:
    """Ray task: `decisions_digest` of the decisions under `dropped_dir` (they stay on the worker)."""
    return decisions_digest(load_dropped(dropped_dir))
