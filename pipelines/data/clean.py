"""Unicode normalization and control-character stripping (the `normalize` stage).

The fraction of non-printable characters is measured here, before stripping, because the
quality filter needs to see how much garbage a document held, not what is left after cleaning.
"""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa

from pipelines.data.config import NormalizeConfig

# C0 and C1 controls except tab and newline (CR is handled first: CRLF and lone CR become LF).
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Other characters that never belong in text: replacement char, private use, noncharacters, surrogates.
_OTHER_NONPRINT_RE = re.compile("[\ufffd\ue000-\uf8ff\ufff0-\ufffc\ufffe\uffff]")


def normalize_text(text: str, cfg: NormalizeConfig) -> tuple[str, float]:
    """-> (normalized text, fraction of non-printable characters in the input)."""
    if not text:
        return text, 0.0
    n = len(text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.strip_control:
        text, n_ctrl = _CONTROL_RE.subn("", text)
    else:
        n_ctrl = len(_CONTROL_RE.findall(text))
    n_other = len(_OTHER_NONPRINT_RE.findall(text))
    if cfg.enabled and not text.isascii():
        text = unicodedata.normalize(cfg.form, text)
    return text, (n_ctrl + n_other) / n


def normalize_batch(batch: pa.Table, cfg: NormalizeConfig) -> pa.Table:
    """Adds `nonprint_frac`; normalizes `text` of good records (bad records pass through untouched)."""
    texts = batch.column("text").to_pylist()
    reasons = batch.column("reason").to_pylist()
    out_text, frac = [], []
    for text, reason in zip(texts, reasons):
        if reason or not cfg.enabled:
            out_text.append(text)
            frac.append(0.0 if reason else normalize_text(text, NormalizeConfig(enabled=False, strip_control=False))[1])
            continue
        t, f = normalize_text(text, cfg)
        out_text.append(t)
        frac.append(f)
    batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(out_text, pa.string()))
    return batch.append_column("nonprint_frac", pa.array(frac, pa.float32()))
