"""Byte-level BPE tokenizer (HF `tokenizers`): training on a text iterator, loading, hashing.

Byte-level means every string is encodable (no unknown token); the special tokens from config
are added first, so their ids are stable (eos and pad are looked up by name, never assumed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # the tokenizer actors import this module; they need no Hydra
    from pipelines.data.config import TokenizerConfig


def train_tokenizer(texts: Iterable[str], vocab_size: int, cfg: TokenizerConfig, out: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=cfg.min_frequency, special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return tok


def load_tokenizer(path: Path | str) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def special_id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"special token {token!r} is not in the tokenizer; list it in tokenizer.special_tokens.")
    return int(i)


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
