"""The fine-tuning data: the user's files (plain text, or chat JSONL with the loss on the answers
only) tokenized with the base model's tokenizer into the same row format preprocessing writes
(`<dir>/{train,val}/*.parquet`: seq_id, tokens (seq_len + 1), loss_mask; and a manifest), so the
training ingest streams it unchanged. Text is packed like preprocessing packs (pipelines/data/pack.py);
a chat conversation is one row (truncated, padded), its mask 1 exactly on the assistant's content,
the newline after it and, after the last answer, EOS."""

from __future__ import annotations

import glob
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from pipelines.data.manifest import MANIFEST_FILE, write_json
from pipelines.data.pack import pack_ids
from pipelines.data.tokenizer import load_tokenizer, special_id
from pipelines.finetune.config import ChatFormat, FilesConfig

EOS, PAD = "<|endoftext|>", "<|pad|>"
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Unusable fine-tuning input; the message names the file, the line and the fix."""


def expand_paths(patterns: list[str]) -> list[Path]:
    out = []
    for pattern in patterns:
        hits = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not hits:
            raise DataError(f"files.paths: {pattern!r} matches no file; give existing text or chat JSONL files.")
        out += [Path(h) for h in hits]
    return out


def chat_row(messages: list[dict[str, Any]], fmt: ChatFormat, tok: Tokenizer, where: str
             ) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation: only the assistant's content (and EOS) counts."""
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        role, content = m.get("role") if isinstance(m, dict) else None, m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"{where}: each message needs a role in {list(ROLES)} and a string content, got {m!r}.")
        prefix, suffix = getattr(fmt, role).split("{content}")
        head = tok.encode(prefix).ids
        body = tok.encode(content + suffix).ids
        ids += head + body
        mask += [0] * len(head) + [1 if role == "assistant" else 0] * len(body)
    if 1 not in mask:
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn; add one.")
    return ids, mask


def read_chat(path: Path, fmt: ChatFormat, tok: Tokenizer, eos: int) -> list[tuple[list[int], list[int]]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}); write one JSON object per line.") from err
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise DataError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}.')
        ids, mask = chat_row(record["messages"], fmt, tok, where)
        rows.append((ids + [eos], mask + [1]))
    return rows


def rows_of(files: FilesConfig, tok: Tokenizer, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All examples as (rows, row_len) tokens and loss mask."""
    eos, pad = special_id(tok, EOS), special_id(tok, PAD)
    token_rows, mask_rows, texts = [], [], []
    for path in expand_paths(files.paths):
        kind = files.format if files.format != "auto" else ("chat" if path.suffix == ".jsonl" else "text")
        if kind == "text":
            texts.append(tok.encode(path.read_text()).ids)
            continue
        for ids, mask in read_chat(path, files.chat, tok, eos):
            ids, mask = ids[:row_len], mask[:row_len]
            token_rows.append(ids + [pad] * (row_len - len(ids)))
            mask_rows.append(mask + [0] * (row_len - len(mask)))
    tokens = np.asarray(token_rows, np.int32).reshape(-1, row_len)
    masks = np.asarray(mask_rows, np.uint8).reshape(-1, row_len)
    if texts:
        packed_t, packed_m = pack_ids(texts, row_len, eos, pad)
        tokens, masks = np.concatenate([tokens, packed_t]), np.concatenate([masks, packed_m])
    keep = masks[:, 1:].sum(1) > 0  # a row whose answer was truncated away teaches nothing
    return tokens[keep], masks[keep]


def write_split(out: Path, tokens: np.ndarray, masks: np.ndarray) -> None:
    out.mkdir(parents=True, exist_ok=True)
    n = len(tokens)
    table = pa.table({"seq_id": pa.array(np.arange(n, dtype=np.int64)),
                      "tokens": pa.array([r.tolist() for r in tokens], pa.list_(pa.int32())),
                      "loss_mask": pa.array([r.tolist() for r in masks], pa.list_(pa.uint8()))})
    pq.write_table(table, out / "part-00000.parquet")


def build_files_dataset(files: FilesConfig, tokenizer_path: Path, seq_len: int, out_dir: Path, seed: int
                        ) -> Path:
    """Tokenize the user's files into `out_dir` (train/val shards + manifest); returns `out_dir`."""
    tok = load_tokenizer(tokenizer_path)
    tokens, masks = rows_of(files, tok, seq_len + 1)
    if len(tokens) < 2:
        raise DataError(f"files.paths gave {len(tokens)} usable examples; fine-tuning needs at least 2 "
                        "(one for validation).")
    order = list(range(len(tokens)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(files.val_fraction * len(tokens)))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    for split, idx in splits.items():
        write_split(out_dir / split, tokens[idx], masks[idx])
    (out_dir / "tokenizer.json").write_bytes(Path(tokenizer_path).read_bytes())
    write_json(out_dir / MANIFEST_FILE, {
        "version": out_dir.name, "seq_len": seq_len, "vocab_size": tok.get_vocab_size(),
        "tokenizer_file": "tokenizer.json", "eos_id": special_id(tok, EOS), "pad_id": special_id(tok, PAD),
        "splits": {s: {"sequences": len(i)} for s, i in splits.items()},
        "files": [str(p) for p in expand_paths(files.paths)]})
    return out_dir
