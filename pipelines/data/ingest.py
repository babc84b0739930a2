"""Training ingest: find a preprocessed output, stream a split, and track the stream position.

Each Ray Train worker gets a disjoint shard (`get_dataset_shard`, a streaming split) and calls
`iter_batches`, which skips every sequence already in the `ConsumedSet`. The training loop
gathers the seq_ids every rank trained on into one `ConsumedSet` and checkpoints its
`state_dict()`; after a restart with any number of workers, each worker skips what was consumed,
so an epoch neither repeats nor skips a sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.data.config import DataConfig
from pipelines.data.manifest import MANIFEST_FILE, list_versions, read_json

if TYPE_CHECKING:
    import ray.data

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


def split_dataset(dataset_dir: Path, split: str) -> ray.data.Dataset:
    """Streaming read of one split's shards (columns seq_id, tokens, loss_mask), in seq_id order."""
    import ray.data

    d = Path(dataset_dir) / split
    files = sorted(d.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no shards in {d}; expected split 'train' or 'val' of a preprocessed output.")
    return ray.data.read_parquet([str(f) for f in files], columns=["seq_id", "tokens", "loss_mask"])


class ConsumedSet:
    """Which seq_ids of a split were already trained on this epoch: a bitmap of `n_sequences` bits."""

    def __init__(self, n_sequences: int) -> None:
        if n_sequences < 0:
            raise ValueError(f"n_sequences={n_sequences} must be >= 0")
        self.n_sequences = n_sequences
        self._bits = np.zeros(n_sequences, dtype=bool)

    @staticmethod
    def _ids(seq_ids: Any) -> np.ndarray:
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.detach().cpu().numpy()
        return np.asarray(seq_ids, dtype=np.int64).reshape(-1)

    def add(self, seq_ids: Any) -> None:
        ids = self._ids(seq_ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_sequences):
            raise IndexError(f"seq_id out of range [0, {self.n_sequences}): {ids.min()}..{ids.max()}")
        self._bits[ids] = True

    def contains(self, seq_ids: Any) -> np.ndarray:
        """Boolean mask: which of `seq_ids` were consumed."""
        return self._bits[self._ids(seq_ids)]

    def update(self, other: ConsumedSet) -> None:
        if other.n_sequences != self.n_sequences:
            raise ValueError(f"cannot merge ConsumedSets over {other.n_sequences} and {self.n_sequences} sequences")
        self._bits |= other._bits

    def clear(self) -> None:
        """Start a new epoch."""
        self._bits[:] = False

    def __len__(self) -> int:
        return int(self._bits.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"n_sequences": self.n_sequences, "bits": np.packbits(self._bits).tobytes()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ConsumedSet:
        c = cls(int(state["n_sequences"]))
        bits = np.unpackbits(np.frombuffer(state["bits"], dtype=np.uint8), count=c.n_sequences)
        c._bits = bits.astype(bool)
        return c


def _lists_2d(col: pa.ChunkedArray | pa.Array, dtype: np.dtype) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(dtype, copy=False).reshape(n, -1) if n else np.zeros((0, 0), dtype)


def iter_batches(shard: ray.data.DataIterator, batch_size: int, consumed: ConsumedSet,
                 shuffle_buffer: int = 0, seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """{"tokens": (B, L+1) int64, "loss_mask": (B, L+1) float32, "seq_id": (B,) int64} batches of
    not-yet-consumed sequences; the last partial batch is dropped. `shuffle_buffer` > 0 mixes rows
    through a local shuffle buffer of that many rows (seeded), so neighbouring sequences of one
    document do not land in the same batch."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n_buf = 0
    shuffle = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed} if shuffle_buffer else {}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", **shuffle):
        seq = batch.column("seq_id").to_numpy()
        keep = ~consumed.contains(seq)
        if not keep.any():
            continue
        tokens = _lists_2d(batch.column("tokens"), np.int64)[keep]
        mask = _lists_2d(batch.column("loss_mask"), np.float32)[keep]
        buf.append((seq[keep].astype(np.int64), tokens, mask))
        n_buf += len(tokens)
        while n_buf >= batch_size:
            seq_all = np.concatenate([b[0] for b in buf])
            tok_all = np.concatenate([b[1] for b in buf])
            mask_all = np.concatenate([b[2] for b in buf])
            yield {"tokens": torch.from_numpy(tok_all[:batch_size].copy()),
                   "loss_mask": torch.from_numpy(mask_all[:batch_size].copy()),
                   "seq_id": torch.from_numpy(seq_all[:batch_size].copy())}
            rest = (seq_all[batch_size:], tok_all[batch_size:], mask_all[batch_size:])
            buf, n_buf = ([rest] if len(rest[0]) else []), len(rest[0])
