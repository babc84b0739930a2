"""Quality filters (the `filters` stage): length, non-printable fraction, repeated lines and n-grams.

Each filter has a name; a dropped document's `reason` is that name, and the manifest counts them.
Filters run in a fixed order and the first failing one names the drop.
"""

from __future__ import annotations

import re
from collections import Counter

import pyarrow as pa

from pipelines.data.config import FilterConfig

TOO_SHORT = "too_short"
TOO_LONG = "too_long"
NON_PRINTABLE = "non_printable"
REPEATED_LINES = "repeated_lines"
REPEATED_NGRAMS = "repeated_ngrams"
FILTER_NAMES = (TOO_SHORT, TOO_LONG, NON_PRINTABLE, REPEATED_LINES, REPEATED_NGRAMS)

_WORD_RE = re.compile(r"\w+")


def repeated_line_frac(text: str) -> float:
    """Fraction of the characters of non-blank lines that sit in a line seen before in the document."""
    seen: set[str] = set()
    total = dup = 0
    for line in text.split("\n"):
        s = line.strip()
        if not s:
            continue
        total += len(s)
        if s in seen:
            dup += len(s)
        else:
            seen.add(s)
    return dup / total if total else 0.0


def repeated_ngram_frac(text: str, n: int) -> float:
    """Fraction of word n-grams that repeat an n-gram seen earlier in the document."""
    words = _WORD_RE.findall(text)
    if len(words) < n + 1:
        return 0.0
    grams = Counter(zip(*(words[i:] for i in range(n))))
    total = len(words) - n + 1
    return (total - len(grams)) / total


def quality_reason(text: str, nonprint_frac: float, cfg: FilterConfig) -> str:
    """The name of the first filter `text` fails, or "" when it passes them all."""
    if not cfg.enabled:
        return ""
    n = len(text)
    if n < cfg.min_chars:
        return TOO_SHORT
    if n > cfg.max_chars:
        return TOO_LONG
    if nonprint_frac > cfg.max_non_printable_frac:
        return NON_PRINTABLE
    if cfg.max_repeated_line_frac < 1 and repeated_line_frac(text) > cfg.max_repeated_line_frac:
        return REPEATED_LINES
    if cfg.max_repeated_ngram_frac < 1 and repeated_ngram_frac(text, cfg.ngram_n) > cfg.max_repeated_ngram_frac:
        return REPEATED_NGRAMS
    return ""


def filter_batch(batch: pa.Table, cfg: FilterConfig) -> pa.Table:
    """Sets `reason` on good records that fail a filter and clears their text (kept for counting)."""
    texts = batch.column("text").to_pylist()
    reasons = batch.column("reason").to_pylist()
    fracs = batch.column("nonprint_frac").to_pylist()
    excerpts = batch.column("excerpt").to_pylist()
    for i, (text, reason, frac) in enumerate(zip(texts, reasons, fracs)):
        if reason:
            continue
        r = quality_reason(text, frac, cfg)
        if r:
            reasons[i], excerpts[i], texts[i] = r, text[:160], ""
    for name, values in (("text", texts), ("reason", reasons), ("excerpt", excerpts)):
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return batch
