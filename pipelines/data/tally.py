"""Corpus counts after dedup, computed per staging file on the workers and summed on the driver.

One Ray Data pass over the staging files gives, per file, the records by reason, per source the
documents by split and by dedup reason, the documents per split counted with their weight
repeats, the train-split bytes, and the kept documents (those phase D tokenizes) with their bytes
times their repeats. The driver folds the counts into one `SplitTally` as the rows stream in and
keeps two numbers per staging file for the tokenize plan: its memory grows with the number of
staging files, never with the documents. `sample_texts` picks phase C's tokenizer sample per
staging file on the workers.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.dedup_cluster import load_dropped
from pipelines.data.split import SPLITS, TRAIN, assign_split, hash_unit, repeats
from pipelines.data.staging import path_blocks

_COLUMNS = ["source", "uid", "hash", "reason", "n_bytes"]


@dataclass
class SplitTally:
    """What the counting pass found: records by reason, where the kept documents go, per-file kept counts."""

    reasons: Counter  # reason ("" = good) -> records
    docs: dict[str, Counter]  # split -> source -> documents
    weighted: dict[str, int]  # split -> documents counted with their weight repeats
    per_source: list[Counter]  # source -> {split or dedup reason: documents}
    train_bytes: int
    files: list[tuple[str, int, int]]  # (staging file, rows, kept documents) in global order
    file_bytes: list[int]  # per staging file: bytes of its kept documents times their repeats

    @property
    def dropped(self) -> Counter:
        """Documents dropped by dedup, by reason."""
        return sum((Counter({k: v for k, v in c.items() if k not in SPLITS}) for c in self.per_source), Counter())


def file_counts(path: str, dropped_dir: str, val_fraction: float, weights: list[float]) -> dict:
    """The counts of one staging file (see the module docstring)."""
    dropped = load_dropped(dropped_dir)
    t = pq.read_table(path, columns=_COLUMNS)
    reasons: Counter = Counter()
    per_source: dict[int, Counter] = {}
    weighted = dict.fromkeys(SPLITS, 0)
    train_bytes = kept = kept_bytes = 0
    for src, uid, h, reason, nb in zip(*(t.column(c).to_pylist() for c in _COLUMNS)):
        reasons[reason] += 1
        if reason:
            continue
        ps = per_source.setdefault(src, Counter())
        if uid in dropped:
            ps[dropped[uid]] += 1
            continue
        s = assign_split(h, val_fraction)
        c = repeats(h, weights[src], s)
        ps[s] += 1
        weighted[s] += c
        train_bytes += nb if s == TRAIN else 0
        kept += c > 0
        kept_bytes += nb * c
    return {"rows": len(t), "kept": kept, "kept_bytes": kept_bytes, "reasons": reasons, "weighted": weighted,
            "per_source": {str(k): v for k, v in per_source.items()}, "train_bytes": train_bytes}


def count_files(batch: pa.Table, dropped_dir: str, val_fraction: float, weights: list[float]) -> pa.Table:
    """Ray Data UDF: staging file paths -> one row of counts (JSON) per file."""
    paths = batch.column("path").to_pylist()
    counts = [json.dumps(file_counts(p, dropped_dir, val_fraction, weights)) for p in paths]
    return pa.table({"path": paths, "counts": counts})


def tally(staging: list[str], dropped_dir: str, val_fraction: float, weights: list[float]) -> SplitTally:
    """The counting pass over the staging files (one Ray Data task per few files), folded in file order."""
    import ray.data

    t = SplitTally(reasons=Counter(), docs={s: Counter() for s in SPLITS}, weighted=dict.fromkeys(SPLITS, 0),
                   per_source=[Counter() for _ in weights], train_bytes=0, files=[], file_bytes=[])
    ds = ray.data.from_arrow(path_blocks(staging))
    ds = ds.map_batches(count_files, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"dropped_dir": dropped_dir, "val_fraction": val_fraction, "weights": weights})
    per_file: list[tuple[str, int, int, int] | None] = [None] * len(staging)  # in staging order, however they came
    index = {p: i for i, p in enumerate(staging)}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for path, raw in zip(batch.column("path").to_pylist(), batch.column("counts").to_pylist()):
            c = json.loads(raw)
            per_file[index[path]] = (path, c["rows"], c["kept"], c["kept_bytes"])
            t.reasons.update(c["reasons"])
            for src, counts in c["per_source"].items():
                t.per_source[int(src)].update(counts)
                for s in SPLITS:
                    t.docs[s][int(src)] += counts.get(s, 0)
            for s in SPLITS:
                t.weighted[s] += c["weighted"][s]
            t.train_bytes += c["train_bytes"]
    t.files = [(p, rows, kept) for p, rows, kept, _ in per_file]
    t.file_bytes = [b for _, _, _, b in per_file]
    return t


def sample_texts(batch: pa.Table, dropped_dir: str, val_fraction: float, rate: float) -> pa.Table:
    """Ray Data UDF: staging file paths -> the texts of their train-split documents chosen for the
    tokenizer sample (content hash below `rate`), in order. (Here, not in `pipeline`, so the
    workers that run it import no torch.)"""
    dropped = load_dropped(dropped_dir)
    out: list[str] = []
    for path in batch.column("path").to_pylist():
        t = pq.read_table(path, columns=["uid", "hash", "reason", "text"], filters=[("reason", "=", "")])
        for uid, h, text in zip(*(t.column(c).to_pylist() for c in ("uid", "hash", "text"))):
            if uid not in dropped and assign_split(h, val_fraction) == TRAIN and hash_unit(h, "tok") < rate:
                out.append(text)
    return pa.table({"text": pa.array(out, pa.string())})
