"""Tokenization and packing into fixed-length sequences (the stateful Ray Data stage).

Documents of one split are concatenated, each followed by EOS, and cut into rows of
`seq_len + 1` tokens (inputs tokens[:-1], targets tokens[1:]). The last row of a batch is padded
with PAD; `loss_mask[i] = 1` when predicting tokens[i] counts, 0 on padding. Packing never
crosses a split or a batch, so the output only depends on the documents and the batch size.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.data.split import SPLITS
from pipelines.data.tokenizer import load_tokenizer, special_id

PACKED_SCHEMA = pa.schema([
    ("split", pa.string()),
    ("tokens", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.uint8())),
    ("n_tokens", pa.int32()),  # real (unpadded) tokens in the row
])


def pack_ids(docs: list[list[int]], row_len: int, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate docs with EOS after each and cut into (rows, row_len) tokens and loss mask."""
    if not docs:
        return np.zeros((0, row_len), np.int32), np.zeros((0, row_len), np.uint8)
    eos = np.array([eos_id], dtype=np.int32)
    flat = np.concatenate([a for d in docs for a in (np.asarray(d, dtype=np.int32), eos)])
    n_rows = -(-len(flat) // row_len)
    tokens = np.full(n_rows * row_len, pad_id, dtype=np.int32)
    mask = np.zeros(n_rows * row_len, dtype=np.uint8)
    tokens[: len(flat)] = flat
    mask[: len(flat)] = 1
    return tokens.reshape(n_rows, row_len), mask.reshape(n_rows, row_len)


def _fixed_lists(rows: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    n, width = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), value_type))


class TokenizePack:
    """Callable class for `map_batches`: loads the tokenizer once per actor, then encodes and packs.

    Input columns: `text`, `split`, `copies` (train-split weight repeats). Output: PACKED_SCHEMA.
    """

    def __init__(self, tokenizer_path: str, seq_len: int, eos_token: str, pad_token: str) -> None:
        self.tok = load_tokenizer(tokenizer_path)
        self.row_len = seq_len + 1
        self.eos_id = special_id(self.tok, eos_token)
        self.pad_id = special_id(self.tok, pad_token)

    def encode(self, texts: list[str]) -> list[list[int]]:
        # Packing needs only the ids: the fast batch encoder skips the character offsets and gives
        # the same ids (tested). Measured on a sixth of the stdlib corpus, 8 runs each alternating:
        # 1.27-1.75 CPU-s against 1.93-2.43 with `encode_batch`.
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = self.encode(batch.column("text").to_pylist())
        return self.pack(ids, batch.column("split").to_pylist(), batch.column("copies").to_pylist())

    def pack(self, ids: list[list[int]], splits: list[str], copies: list[int]) -> pa.Table:
        parts = []
        for split in SPLITS:
            docs = [d for d, s, c in zip(ids, splits, copies) if s == split for _ in range(c)]
            tokens, mask = pack_ids(docs, self.row_len, self.eos_id, self.pad_id)
            if len(tokens):
                parts.append(pa.table({
                    "split": pa.array([split] * len(tokens), pa.string()),
                    "tokens": _fixed_lists(tokens, pa.int32()),
                    "loss_mask": _fixed_lists(mask, pa.uint8()),
                    "n_tokens": pa.array(mask.sum(axis=1, dtype=np.int32), pa.int32()),
                }, schema=PACKED_SCHEMA))
        return pa.concat_tables(parts) if parts else PACKED_SCHEMA.empty_table()
