"""Input sources: resolve `SourceConfig`s to files, fingerprint them, and read them into records.

Reading never raises for bad input. Every problem becomes a record with a `reason` (and an
excerpt for the quarantine file) while every good record of the same file still comes through:
unreadable paths, empty files, binary files, invalid UTF-8, malformed JSONL lines, records
missing the text field, and records larger than `reader.max_record_bytes` (skipped in bounded
memory: a 50 MB line is read in 1 MiB chunks and discarded, never held whole).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.config import ReaderConfig, SourceConfig

# Reasons a record can be dropped while reading (the manifest counts each one).
UNREADABLE_PATH = "unreadable_path"  # configured path/glob that matches nothing
UNREADABLE = "unreadable"  # open/read failed (permissions, broken link, corrupt Parquet, ...)
EMPTY_FILE = "empty_file"
BINARY_FILE = "binary_file"
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
FIELD_NOT_STRING = "field_not_string"
RECORD_TOO_LARGE = "record_too_large"

RAW_SCHEMA = pa.schema([
    ("source", pa.int32()),
    ("path", pa.string()),
    ("record", pa.int64()),  # line number (JSONL), row (Parquet), 0 (text file), -1 (whole-file problem)
    ("reason", pa.string()),  # "" for a good record
    ("text", pa.string()),
    ("excerpt", pa.string()),  # what the quarantine file shows for a bad record
    ("n_bytes", pa.int64()),
])

_SUFFIXES = {"jsonl": (".jsonl", ".ndjson", ".json"), "parquet": (".parquet",)}
_CHUNK = 1 << 20
_EXCERPT = 160


@dataclass(frozen=True)
class InputFile:
    source: int
    kind: str
    path: str
    field: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[str]:
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(out)


def _expand(kind: str, path: str) -> list[str]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = [str(f) for f in p.rglob("*") if not f.is_dir()]
        if kind in _SUFFIXES:
            files = [f for f in files if f.endswith(_SUFFIXES[kind])]
        return sorted(files)
    if p.exists() or p.is_symlink():
        return [str(p)]
    return sorted(f for f in glob.glob(str(p), recursive=True) if not os.path.isdir(f))


def _hash_order(path: str) -> bytes:
    return hashlib.blake2b(path.encode(), digest_size=8).digest()


def resolve_sources(sources: list[SourceConfig]) -> tuple[list[InputFile], list[tuple[int, str]]]:
    """-> (files to read, [(source index, path)] for configured paths that match nothing).

    `max_files` keeps a deterministic sample: the files whose path hash sorts first.
    """
    files: list[InputFile] = []
    missing: list[tuple[int, str]] = []
    for i, s in enumerate(sources):
        paths = _stdlib_files() if s.kind == "stdlib" else _expand(s.kind, str(s.path))
        if not paths:
            missing.append((i, "<stdlib>" if s.kind == "stdlib" else str(s.path)))
            continue
        if s.max_files is not None and len(paths) > s.max_files:
            paths = sorted(sorted(paths, key=_hash_order)[: s.max_files])
        files.extend(InputFile(i, "text" if s.kind == "stdlib" else s.kind, p, s.field) for p in paths)
    return files, missing


def fingerprint_files(files: list[InputFile], missing: list[tuple[int, str]], n_sources: int) -> list[dict]:
    """Per source: file count, bytes and a hash over (path, size, mtime_ns) of every file."""
    hashers = [hashlib.sha256() for _ in range(n_sources)]
    counts = [0] * n_sources
    sizes = [0] * n_sources
    for f in files:
        try:
            st = os.stat(f.path)
            sig = f"{f.path}\0{st.st_size}\0{st.st_mtime_ns}\n"
            sizes[f.source] += st.st_size
        except OSError as e:
            sig = f"{f.path}\0unreadable:{type(e).__name__}\n"
        hashers[f.source].update(sig.encode())
        counts[f.source] += 1
    for i, p in missing:
        hashers[i].update(f"missing:{p}\n".encode())
    return [{"files": counts[i], "bytes": sizes[i], "sha256": hashers[i].hexdigest()} for i in range(n_sources)]


# ---------------------------------------------------------------- reading (runs inside Ray Data tasks)

def _excerpt(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        return repr(raw[:_EXCERPT])[2:-1]
    return raw[:_EXCERPT]


def _decode(raw: bytes, policy: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace") if policy == "replace" else None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


Record = tuple[int, str, str, str, str, int]  # record, reason, text, excerpt, n_bytes


def _iter_lines(fh, max_bytes: int) -> Iterator[tuple[int, bytes | None, bytes]]:
    """(line number, line bytes or None when longer than max_bytes, head for the excerpt); bounded memory."""
    buf = bytearray()
    head = b""
    skipping = False
    lineno = 0
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            break
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl == -1 else chunk[start:nl]
            if not skipping:
                buf += piece
                if len(buf) > max_bytes:
                    head, skipping = bytes(buf[:_EXCERPT]), True
                    buf = bytearray()
            if nl == -1:
                break
            yield (lineno, None, head) if skipping else (lineno, bytes(buf), b"")
            buf, skipping, lineno, start = bytearray(), False, lineno + 1, nl + 1
    if skipping:
        yield lineno, None, head
    elif buf:
        yield lineno, bytes(buf), b""


def _read_text(path: str, rc: ReaderConfig) -> Iterator[Record]:
    with open(path, "rb") as fh:
        raw = fh.read(rc.max_record_bytes + 1)
    if not raw:
        yield -1, EMPTY_FILE, "", "", 0
    elif b"\0" in raw[: rc.binary_sniff_bytes]:
        yield -1, BINARY_FILE, "", _excerpt(raw), len(raw)
    elif len(raw) > rc.max_record_bytes:
        yield 0, RECORD_TOO_LARGE, "", _excerpt(raw), os.path.getsize(path)
    else:
        text = _decode(raw, rc.on_invalid_utf8)
        if text is None:
            yield 0, INVALID_UTF8, "", _excerpt(raw), len(raw)
        else:
            yield 0, "", text.removeprefix("\ufeff"), "", len(raw)


def _read_jsonl(path: str, field: str, rc: ReaderConfig) -> Iterator[Record]:
    with open(path, "rb") as fh:
        head = fh.read(rc.binary_sniff_bytes)
        if not head:
            yield -1, EMPTY_FILE, "", "", 0
            return
        if b"\0" in head:
            yield -1, BINARY_FILE, "", _excerpt(head), os.path.getsize(path)
            return
        fh.seek(0)
        for lineno, raw, big_head in _iter_lines(fh, rc.max_record_bytes):
            if raw is None:
                yield lineno, RECORD_TOO_LARGE, "", _excerpt(big_head), rc.max_record_bytes + 1
                continue
            if not raw.strip():
                continue  # blank lines are not records
            line = _decode(raw, rc.on_invalid_utf8)
            if line is None:
                yield lineno, INVALID_UTF8, "", _excerpt(raw), len(raw)
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield lineno, MALFORMED_JSON, "", _excerpt(line), len(raw)
                continue
            if not isinstance(obj, dict):
                yield lineno, NOT_AN_OBJECT, "", _excerpt(line), len(raw)
            elif obj.get(field) is None:
                yield lineno, MISSING_FIELD, "", _excerpt(line), len(raw)
            elif not isinstance(obj[field], str):
                yield lineno, FIELD_NOT_STRING, "", _excerpt(line), len(raw)
            elif not _encodable(obj[field]):  # a lone surrogate escape such as "\ud800"
                yield lineno, INVALID_UTF8, "", _excerpt(line), len(raw)
            else:
                yield lineno, "", obj[field], "", len(raw)


def _read_parquet(path: str, field: str, rc: ReaderConfig) -> Iterator[Record]:
    if os.path.getsize(path) == 0:
        yield -1, EMPTY_FILE, "", "", 0
        return
    pf = pq.ParquetFile(path)
    if pf.metadata.num_rows == 0:
        yield -1, EMPTY_FILE, "", "", 0
        return
    if field not in pf.schema_arrow.names:
        yield -1, MISSING_FIELD, "", f"no column {field!r}; columns: {pf.schema_arrow.names}"[:_EXCERPT], 0
        return
    ftype = pf.schema_arrow.field(field).type
    is_str = pa.types.is_string(ftype) or pa.types.is_large_string(ftype)
    is_bin = pa.types.is_binary(ftype) or pa.types.is_large_binary(ftype)
    if not (is_str or is_bin):
        yield -1, FIELD_NOT_STRING, "", f"column {field!r} has type {ftype}"[:_EXCERPT], 0
        return
    row = 0
    for batch in pf.iter_batches(batch_size=rc.records_per_batch, columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is None:
                yield row, MISSING_FIELD, "", "null", 0
            elif is_bin:
                n = len(value)
                if n > rc.max_record_bytes:
                    yield row, RECORD_TOO_LARGE, "", _excerpt(value), n
                elif (text := _decode(value, rc.on_invalid_utf8)) is None:
                    yield row, INVALID_UTF8, "", _excerpt(value), n
                else:
                    yield row, "", text, "", n
            else:
                n = len(value.encode("utf-8"))
                if n > rc.max_record_bytes:
                    yield row, RECORD_TOO_LARGE, "", _excerpt(value), n
                else:
                    yield row, "", value, "", n
            row += 1


def read_file(f: InputFile, rc: ReaderConfig) -> Iterator[Record]:
    """Records of one file; any exception after some good records still keeps those records."""
    try:
        if f.kind == "text":
            yield from _read_text(f.path, rc)
        elif f.kind == "jsonl":
            yield from _read_jsonl(f.path, f.field, rc)
        else:
            yield from _read_parquet(f.path, f.field, rc)
    except Exception as e:  # noqa: BLE001 - bad input must never crash the run
        yield -1, UNREADABLE, "", f"{type(e).__name__}: {e}"[:_EXCERPT], 0


def read_tasks(files: list[InputFile], bytes_per_task: int, min_tasks: int = 1) -> list[list[InputFile]]:
    """Files grouped in order into read tasks of at most about `bytes_per_task` input bytes each,
    smaller when that gives fewer than `min_tasks` tasks (one per CPU keeps a large cluster busy).

    Sized by bytes, not file count: a corpus of many small files gets few tasks (Ray's per-task
    cost measured about 30 ms of CPU; on the stdlib corpus phase A went from 3.7-4.0 s at 32 files
    per task to 3.1-3.2 s at 4 MB per task), and a few big files still get one task each. A file
    that cannot be stat'ed counts as 0 bytes; its reader reports why it cannot be read."""
    sizes = []
    for f in files:
        try:
            sizes.append(os.stat(f.path).st_size)
        except OSError:
            sizes.append(0)
    target = min(bytes_per_task, -(-sum(sizes) // max(min_tasks, 1)))
    tasks: list[list[InputFile]] = []
    group: list[InputFile] = []
    size = 0
    for f, n in zip(files, sizes):
        if group and size + n > target:
            tasks.append(group)
            group, size = [], 0
        group.append(f)
        size += n
    if group:
        tasks.append(group)
    return tasks


def files_table(files: list[InputFile]) -> pa.Table:
    return pa.table({
        "source": pa.array([f.source for f in files], pa.int32()),
        "kind": [f.kind for f in files],
        "path": [f.path for f in files],
        "field": [f.field for f in files],
    })


def missing_table(missing: list[tuple[int, str]]) -> pa.Table:
    n = len(missing)
    return pa.table({
        "source": pa.array([m[0] for m in missing], pa.int32()), "path": [m[1] for m in missing],
        "record": pa.array([-1] * n, pa.int64()), "reason": [UNREADABLE_PATH] * n, "text": [""] * n,
        "excerpt": ["no file matches this path or glob"] * n, "n_bytes": pa.array([0] * n, pa.int64()),
    }, schema=RAW_SCHEMA)


def read_files(batch: pa.Table, rc: ReaderConfig) -> Iterator[pa.Table]:
    """Ray Data UDF: a batch of `files_table` rows -> RAW_SCHEMA tables of `records_per_batch` records."""
    cols: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
    for src, kind, path, field in zip(*(batch.column(c).to_pylist() for c in ("source", "kind", "path", "field"))):
        for rec in read_file(InputFile(src, kind, path, field), rc):
            for name, value in zip(RAW_SCHEMA.names, (src, path, *rec)):
                cols[name].append(value)
            if len(cols["path"]) >= rc.records_per_batch:
                yield pa.table(cols, schema=RAW_SCHEMA)
                cols = {name: [] for name in RAW_SCHEMA.names}
    if cols["path"]:
        yield pa.table(cols, schema=RAW_SCHEMA)
