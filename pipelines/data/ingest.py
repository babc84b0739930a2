"""Training ingest: find a preprocessed output, the global order of its sequences, and stream them.

The order of training sequences is a function of the seed and the epoch only (`GlobalOrder`): the
split's Parquet row groups are permuted, then the sequences of each window of `window` row groups
are permuted among themselves, both from `numpy.random.default_rng((seed, epoch, ...))`. Step s
trains the s-th run of `global_batch` sequences of that order (`GlobalOrder.step_ids`), whatever the
world size; data-parallel rank r of D takes its contiguous slice (`rank_slice`), cut into
micro-batches. So the data position is the step number, and a restart at any size continues exactly
where the uninterrupted run would be. The sequences that do not fill a last global batch of an epoch
are left out of that epoch (a different set each epoch).

`SplitReader` reads the rows of given seq_ids from the Parquet shards one row group at a time and
keeps only the last few row groups in memory (an LRU of `cache_groups`), so a split larger than
memory streams: a window's steps touch only its row groups. Only the seq_id column is read to
index the split (and only where the Parquet statistics do not already give each row group's range).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.data.config import DataConfig
from pipelines.data.manifest import MANIFEST_FILE, list_versions, read_json

_REQUIRED = ("version", "seq_len", "vocab_size", "tokenizer_file", "eos_id", "pad_id", "splits")


def resolve_dataset_dir(data: DataConfig) -> Path:
    """`data.version` ("latest" or a version directory name) under `data.output_dir` -> its path."""
    root = Path(data.output_dir).expanduser().resolve()
    if data.version == "latest":
        versions = list_versions(root)
        if not versions:
            raise FileNotFoundError(
                f"no preprocessed dataset under {root} (data.output_dir); run `python -m pipelines.preprocess` "
                f"with the same data config (data={data.name}) first.")
        return versions[-1][2]
    path = root / data.version
    if not (path / MANIFEST_FILE).is_file():
        have = ", ".join(p.name for _, _, p in list_versions(root)) or "none"
        raise FileNotFoundError(
            f"data.version={data.version!r}: no complete output at {path} (available: {have}); use "
            "data.version=latest or run `python -m pipelines.preprocess`.")
    return path


def read_manifest(dataset_dir: Path) -> dict[str, Any]:
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `python -m pipelines.preprocess`.")
    m = read_json(path)
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was written by another version, re-run preprocessing.")
    return m


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of a split: rows hold seq_ids first .. first + rows - 1."""

    path: Path
    index: int
    first: int
    rows: int


def _row_group_range(pf: pq.ParquetFile, i: int) -> tuple[int, int]:
    """(first seq_id, rows) of row group i: from the column statistics, else from the seq_id column."""
    meta = pf.metadata.row_group(i)
    col = meta.column(pf.schema_arrow.get_field_index("seq_id"))
    stats = col.statistics
    if stats is not None and stats.has_min_max and stats.max - stats.min + 1 == meta.num_rows:
        return int(stats.min), meta.num_rows
    ids = pf.read_row_group(i, columns=["seq_id"]).column(0).to_numpy()
    if len(ids) and not np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        raise ValueError(f"row group {i} of a shard: seq_ids are not consecutive; re-run preprocessing.")
    return (int(ids[0]) if len(ids) else 0), len(ids)


def index_split(dataset_dir: Path, split: str) -> list[RowGroup]:
    """The split's row groups in seq_id order; they must cover 0..N-1 exactly once (what shards.py writes)."""
    d = Path(dataset_dir) / split
    files = sorted(d.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no shards in {d}; expected split 'train' or 'val' of a preprocessed output.")
    groups = []
    for f in files:
        pf = pq.ParquetFile(f)
        groups += [RowGroup(f, i, *_row_group_range(pf, i)) for i in range(pf.num_row_groups)]
    groups = sorted((g for g in groups if g.rows), key=lambda g: g.first)
    expected = 0
    for g in groups:
        if g.first != expected:
            raise ValueError(f"{d}: seq_ids jump from {expected - 1} to {g.first} at {g.path.name}; the split is "
                             "incomplete or mixed with another output; re-run `python -m pipelines.preprocess`.")
        expected += g.rows
    return groups


class GlobalOrder:
    """The epoch's order of a split's seq_ids as a function of (seed, epoch) only (module docstring)."""

    def __init__(self, groups: list[RowGroup], seed: int, global_batch: int, window: int) -> None:
        self.groups, self.seed, self.global_batch, self.window = groups, seed, global_batch, window
        self.n_sequences = sum(g.rows for g in groups)
        self.steps_per_epoch = self.n_sequences // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the split has {self.n_sequences} sequences, fewer than one global batch of "
                             f"{global_batch}; add data or lower train.global_batch_size.")
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """Every seq_id once, in epoch `epoch`'s order."""
        if epoch != self._epoch:
            perm = np.random.default_rng((self.seed, epoch, 0)).permutation(len(self.groups))
            parts = []
            for w in range(0, len(perm), self.window):
                ids = np.concatenate([np.arange(self.groups[i].first, self.groups[i].first + self.groups[i].rows)
                                      for i in perm[w:w + self.window]])
                parts.append(np.random.default_rng((self.seed, epoch, 1 + w)).permutation(ids))
            self._epoch, self._order = epoch, np.concatenate(parts)
        return self._order

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_ids(self, step: int) -> np.ndarray:
        """The seq_ids of step `step`'s global batch (steps count from 0 over all epochs)."""
        k = step % self.steps_per_epoch
        return self.order(self.epoch_of(step))[k * self.global_batch:(k + 1) * self.global_batch]


def rank_slice(ids: np.ndarray, data_rank: int, data_ranks: int) -> np.ndarray:
    """Data-parallel rank `data_rank`'s contiguous share of a global batch."""
    if len(ids) % data_ranks:
        raise ValueError(f"a global batch of {len(ids)} does not split over {data_ranks} data-parallel ranks")
    n = len(ids) // data_ranks
    return ids[data_rank * n:(data_rank + 1) * n]


class SplitReader:
    """Rows of given seq_ids, read from the split's Parquet row groups (an LRU of `cache_groups` in memory)."""

    COLUMNS = ["seq_id", "tokens", "loss_mask"]

    def __init__(self, groups: list[RowGroup], cache_groups: int = 8) -> None:
        self.groups, self.cache_groups = groups, max(1, cache_groups)
        self._starts = np.array([g.first for g in groups], dtype=np.int64)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.row_groups_read = 0

    def _group(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        g = self.groups[i]
        t = pq.ParquetFile(g.path).read_row_group(g.index, columns=self.COLUMNS[1:])
        rows = (_lists_2d(t.column("tokens"), np.int64), _lists_2d(t.column("loss_mask"), np.float32))
        self._cache[i] = rows
        self.row_groups_read += 1
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return rows

    def read(self, seq_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """{"tokens": (B, L+1) int64, "loss_mask": (B, L+1) float32, "seq_id": (B,) int64} in the given order."""
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        n = self.groups[-1].first + self.groups[-1].rows
        if len(seq_ids) and (seq_ids.min() < 0 or seq_ids.max() >= n):
            raise IndexError(f"seq_id out of range [0, {n}): {seq_ids.min()}..{seq_ids.max()}")
        where = np.searchsorted(self._starts, seq_ids, side="right") - 1
        tokens = mask = None
        for i in np.unique(where):
            rows = np.flatnonzero(where == i)
            tok, msk = self._group(int(i))
            local = seq_ids[rows] - self.groups[i].first
            if tokens is None:
                tokens = np.empty((len(seq_ids), tok.shape[1]), np.int64)
                mask = np.empty((len(seq_ids), tok.shape[1]), np.float32)
            tokens[rows], mask[rows] = tok[local], msk[local]
        return {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask),
                "seq_id": torch.from_numpy(seq_ids.copy())}


class SampleLedger:
    """Which sequences each trained step consumed: row s holds step s's global batch (sorted seq_ids).

    Saved with every checkpoint (`save`/`load`: a plain .npy, never unpickled), so it always describes
    the trajectory that survived; `check` compares it with the global order."""

    def __init__(self, rows: np.ndarray | None = None) -> None:
        self.rows: list[np.ndarray] = [] if rows is None else list(rows)

    def record(self, step: int, ids: np.ndarray) -> None:
        if step != len(self.rows):
            raise ValueError(f"ledger has {len(self.rows)} steps; cannot record step {step}")
        self.rows.append(np.sort(np.asarray(ids, dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sequences(self) -> int:
        return sum(len(r) for r in self.rows)

    def save(self, path: Path) -> None:
        np.save(path, np.stack(self.rows) if self.rows else np.zeros((0, 0), np.int64), allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> SampleLedger:
        rows = np.load(path, allow_pickle=False)
        return cls(rows if len(rows) else None)

    def check(self, order: GlobalOrder) -> list[str]:
        """Problems: a step that trained other sequences than the order says, a sequence twice in an epoch."""
        problems = [f"step {s}: trained {len(set(r) ^ set(order.step_ids(s)))} sequences other than the order's"
                    for s, r in enumerate(self.rows) if not np.array_equal(r, np.sort(order.step_ids(s)))]
        for epoch in range(order.epoch_of(len(self.rows) - 1) + 1 if self.rows else 0):
            ids = np.concatenate(self.rows[epoch * order.steps_per_epoch:(epoch + 1) * order.steps_per_epoch])
            if len(np.unique(ids)) != len(ids):
                problems.append(f"epoch {epoch}: {len(ids) - len(np.unique(ids))} sequences trained twice")
        return problems


def _lists_2d(col: Any, dtype: np.dtype) -> np.ndarray:
    arr = col.combine_chunks()
    n = len(arr)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(dtype, copy=False).reshape(n, -1) if n else np.zeros((0, 0), dtype)
