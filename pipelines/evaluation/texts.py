"""What an evaluation reads: the validation split's packed sequences (pyarrow, no Ray), documents
of user files (text, JSONL, Parquet), and the UTF-8 byte length of every token (for bits per byte).

Every user-caused problem (missing file, no text in it, a missing JSONL key or Parquet column, a
split that is absent) is an `EvaluationInputError` naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, pre_tokenizers


class EvaluationInputError(ValueError):
    """Input an evaluation cannot use; the message names it and the fix."""


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """(V,) UTF-8 bytes each token stands for. Byte-level BPE writes one alphabet character per byte;
    added (special) tokens stand for their text."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
    lengths = torch.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=torch.int64)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i in added:
            lengths[i] = len(added[i].encode("utf-8"))
        elif all(ch in alphabet for ch in token):
            lengths[i] = len(token)
        else:
            lengths[i] = len(token.encode("utf-8"))
    return lengths


def read_split(dataset_dir: Path, split: str, max_sequences: int, contiguous: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N, L+1) int64, loss_mask (N, L+1) float32) of a split in seq_id order; `max_sequences`
    > 0 keeps that many: evenly spaced over the split (neighbouring sequences often come from one
    document), or the first ones when `contiguous` (whole documents, for the choice task)."""
    files = sorted((Path(dataset_dir) / split).glob("*.parquet"))
    if not files:
        raise EvaluationInputError(f"no {split} shards in {Path(dataset_dir) / split}; run "
                                   "`python -m pipelines.preprocess` with the same data config.")
    table = pa.concat_tables([pq.read_table(str(f), columns=["seq_id", "tokens", "loss_mask"]) for f in files])
    order = np.argsort(table.column("seq_id").to_numpy())
    n = len(order)
    if max_sequences and n > max_sequences:
        keep = np.arange(max_sequences) if contiguous else np.linspace(0, n - 1, max_sequences).round()
        order = order[np.unique(keep.astype(np.int64))]
    tokens = _lists_2d(table.column("tokens"), np.int64)[order]
    mask = _lists_2d(table.column("loss_mask"), np.float32)[order]
    return torch.from_numpy(tokens.copy()), torch.from_numpy(mask.copy())


def _lists_2d(col, dtype: np.dtype) -> np.ndarray:
    arr = col.combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(dtype, copy=False).reshape(len(arr), -1) if len(arr) else np.zeros((0, 0), dtype)


def _jsonl_texts(path: Path, key: str) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvaluationInputError(f"{path}:{n} is not JSON ({err.msg}); each line of a .jsonl file is one "
                                       "JSON object.") from err
        if not isinstance(record, dict) or key not in record:
            raise EvaluationInputError(f"{path}:{n} has no key {key!r}; set files.text_field to the key "
                                       "holding the text.")
        texts.append(str(record[key]))
    return texts


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of one user file: a .jsonl record's or .parquet row's `text_field`, or the whole
    file as text for any other extension."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvaluationInputError(f"files.paths: {path} does not exist; name text, .jsonl or .parquet files.")
    if p.suffix == ".jsonl":
        docs = _jsonl_texts(p, text_field)
    elif p.suffix == ".parquet":
        schema = pq.read_schema(str(p))
        if text_field not in schema.names:
            raise EvaluationInputError(f"{p} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                                       "set files.text_field.")
        docs = [str(t) for t in pq.read_table(str(p), columns=[text_field]).column(text_field).to_pylist()
                if t is not None]
    else:
        try:
            docs = [p.read_text(encoding="utf-8")]
        except UnicodeDecodeError as err:
            raise EvaluationInputError(f"{p} is not UTF-8 text; convert it or name a .jsonl/.parquet file.") from err
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EvaluationInputError(f"{p} holds no text to score (empty file or only blank records).")
    return docs


def pack_documents(docs: list[str], tok: Tokenizer, eos_id: int | None, max_tokens: int) -> torch.Tensor:
    """One token stream: each document's ids, then eos (when the tokenizer has one), at most `max_tokens`."""
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        if eos_id is not None:
            ids.append(eos_id)
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def windows(stream: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a stream into rows of `length + 1` tokens overlapping by one, so every token after the
    first is predicted exactly once; (tokens (N, length+1), loss_mask (N, length+1)), right-padded."""
    n_targets = stream.numel() - 1
    if n_targets <= 0:
        raise EvaluationInputError("a scored file needs at least two tokens.")
    rows = (n_targets + length - 1) // length
    tokens = torch.zeros(rows, length + 1, dtype=torch.long)
    mask = torch.zeros(rows, length + 1, dtype=torch.float32)
    for r in range(rows):
        piece = stream[r * length:r * length + length + 1]
        tokens[r, :piece.numel()] = piece
        mask[r, 1:piece.numel()] = 1.0
    return tokens, mask
