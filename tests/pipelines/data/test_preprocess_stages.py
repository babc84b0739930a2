"""Each preprocessing stage on small real inputs (stdlib sources, real tokenizers), no Ray needed."""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data import filters
from pipelines.data.clean import normalize_text
from pipelines.data.config import DedupConfig, FilterConfig, NormalizeConfig, ReaderConfig, TokenizerConfig
from pipelines.data.dedup import EXACT_DUPLICATE, NEAR_DUPLICATE, content_hash, decide, record_uid
from pipelines.data.minhash import lsh_params, signature
from pipelines.data.pack import TokenizePack, pack_ids
from pipelines.data.sources import _iter_lines
from pipelines.data.split import TRAIN, VAL, assign_split, repeats
from pipelines.data.staging import MAX_BLOCKS, path_blocks, read_paths, write_bad_records
from pipelines.data.tokenizer import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _src(name: str) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")


def test_normalize_forms_and_control_stripping() -> None:
    text, frac = normalize_text("cafe\u0301\r\nline\x00two\x07\rend\tok", NormalizeConfig(form="NFC"))
    assert text == "caf\u00e9\nlinetwo\nend\tok"
    assert frac == pytest.approx(2 / 23)  # two control characters among the 23 input characters
    assert normalize_text("\ufb01le \u2460", NormalizeConfig(form="NFKC"))[0] == "file 1"
    assert normalize_text("\ufb01le", NormalizeConfig(form="NFC"))[0] == "\ufb01le"
    kept, _ = normalize_text("a\x01b", NormalizeConfig(strip_control=False))
    assert kept == "a\x01b"


def test_quality_filters_each_reason() -> None:
    cfg = FilterConfig(min_chars=64, max_chars=20_000)
    real = _src("textwrap.py")[:4000]
    assert filters.quality_reason(real, 0.0, cfg) == ""
    assert filters.quality_reason("x = 1\n", 0.0, cfg) == filters.TOO_SHORT
    assert filters.quality_reason(_src("textwrap.py") * 2, 0.0, cfg) == filters.TOO_LONG
    assert filters.quality_reason(real, 0.2, cfg) == filters.NON_PRINTABLE
    assert filters.quality_reason("import os\n" + "print('spam and eggs')\n" * 40, 0.0, cfg) == filters.REPEATED_LINES
    assert filters.quality_reason("the spam and the eggs are here " * 40, 0.0, cfg) == filters.REPEATED_NGRAMS
    assert filters.repeated_line_frac("a\nb\nc\n") == 0.0
    assert filters.repeated_line_frac("aa\naa\n") == pytest.approx(0.5)
    assert filters.quality_reason("x", 1.0, FilterConfig(enabled=False)) == ""


def test_minhash_finds_near_duplicates_of_real_files() -> None:
    a = _src("shlex.py")
    lines = a.split("\n")
    lines[40] = "# an edited line that makes this a near-duplicate, not an exact one"
    near = "\n".join(lines)
    other = _src("fnmatch.py")
    sa, sn, so = (signature(t, 128, 5, 1) for t in (a, near, other))
    assert sa.dtype == np.uint32 and sa.shape == (128,)
    assert np.mean(sa == sn) > 0.9 and np.mean(sa == so) < 0.2
    assert np.array_equal(sa, signature(a, 128, 5, 1))  # stable
    bands, rows = lsh_params(0.85, 128)
    assert bands * rows <= 128 and rows > bands


def test_dedup_keeps_first_and_counts_exact_and_near() -> None:
    a, other = _src("shlex.py"), _src("fnmatch.py")
    near = a.replace("shlex", "shlexx", 1)
    docs = [(0, "b.py", 0, a), (0, "a.py", 0, other), (0, "c.py", 0, a), (1, "a.py", 0, near)]
    cfg = DedupConfig()
    sigs = [signature(t, cfg.num_perm, cfg.shingle_size, cfg.seed) for *_, t in docs]
    keys = pa.table({
        "source": pa.array([d[0] for d in docs], pa.int32()), "path": [d[1] for d in docs],
        "record": pa.array([d[2] for d in docs], pa.int64()),
        "uid": [record_uid(*d[:3]) for d in docs], "hash": [content_hash(d[3]) for d in docs],
        "minhash": pa.array([s.tolist() for s in sigs], pa.list_(pa.uint32())),
    })
    r = decide(keys, cfg)
    assert r.dropped == {record_uid(0, "c.py", 0): EXACT_DUPLICATE, record_uid(1, "a.py", 0): NEAR_DUPLICATE}
    assert (r.docs_in, r.exact_dropped, r.near_dropped) == (4, 1, 1)
    assert decide(keys, DedupConfig(near=False)).dropped == {record_uid(0, "c.py", 0): EXACT_DUPLICATE}


def test_split_is_deterministic_and_weights_repeat() -> None:
    hashes = [content_hash(str(i)) for i in range(4000)]
    splits = [assign_split(h, 0.1) for h in hashes]
    assert splits == [assign_split(h, 0.1) for h in hashes]
    assert 0.08 < splits.count(VAL) / len(splits) < 0.12
    assert all(repeats(h, 2.0, TRAIN) == 2 for h in hashes[:50])
    assert all(repeats(h, 2.0, VAL) == 1 for h in hashes[:50])
    assert all(repeats(h, 0.0, TRAIN) == 0 for h in hashes[:50])
    half = sum(repeats(h, 0.5, TRAIN) for h in hashes) / len(hashes)
    assert 0.45 < half < 0.55


def test_pack_ids_layout() -> None:
    tokens, mask = pack_ids([[5, 6, 7], [8], [9, 10]], row_len=4, eos_id=0, pad_id=1)
    assert tokens.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10], [0, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert pack_ids([], 4, 0, 1)[0].shape == (0, 4)


def test_byte_level_bpe_from_config(tmp_path: Path) -> None:
    texts = [_src(n) for n in ("textwrap.py", "shlex.py", "fnmatch.py")]
    cfg = TokenizerConfig(special_tokens=["<|endoftext|>", "<|pad|>", "<|sep|>"])
    tok = train_tokenizer(iter(texts), 400, cfg, tmp_path / "tok.json")
    assert tok.get_vocab_size() == 400
    assert [tok.token_to_id(t) for t in cfg.special_tokens] == [0, 1, 2]
    for s in (texts[0][:500], "na\u00efve \u65e5\u672c \U0001f600 \x00"):  # bytes never seen in training still encode
        assert tok.decode(tok.encode(s).ids) == s


def test_tokenize_pack_encodes_exactly_like_the_tokenizer(tmp_path: Path) -> None:
    """`TokenizePack.encode` uses the fast batch encoder; its ids must be the plain encoder's, text by text."""
    texts = [_src(n) for n in ("textwrap.py", "shlex.py", "fnmatch.py")]
    cfg = TokenizerConfig(special_tokens=["<|endoftext|>", "<|pad|>"])
    tok = train_tokenizer(iter(texts), 400, cfg, tmp_path / "tok.json")
    tp = TokenizePack(str(tmp_path / "tok.json"), 16, "<|endoftext|>", "<|pad|>")
    batch = [*texts, "", "na\u00efve \u65e5\u672c \U0001f600 \x00", "<|endoftext|> stays text"]
    assert tp.encode(batch) == [tok.encode(t, add_special_tokens=False).ids for t in batch]


def test_line_reader_skips_a_huge_line_in_bounded_chunks() -> None:
    data = b'{"a": 1}\n' + b"x" * (3 << 20) + b"\n" + b'{"a": 2}\n' + b"tail"
    lines = list(_iter_lines(io.BytesIO(data), max_bytes=1 << 20))
    assert [(n, r) for n, r, _ in lines] == [(0, b'{"a": 1}'), (1, None), (2, b'{"a": 2}'), (3, b"tail")]
    assert lines[1][2] == b"x" * 160
    assert ReaderConfig().max_record_bytes < 50_000_000


def test_reader_policies_per_record(tmp_path: Path) -> None:
    from pipelines.data.sources import InputFile, read_file

    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    f = InputFile(0, "text", str(tmp_path / "latin1.txt"), "text")
    assert [r[1] for r in read_file(f, ReaderConfig())] == ["invalid_utf8"]
    (rec,) = read_file(f, ReaderConfig(on_invalid_utf8="replace"))
    assert rec[1] == "" and rec[2] == "caf\ufffd au lait"

    (tmp_path / "s.jsonl").write_text('{"text": "ok one"}\n{"text": "\\ud800 lone surrogate"}\n{"text": "ok two"}\n')
    recs = list(read_file(InputFile(0, "jsonl", str(tmp_path / "s.jsonl"), "text"), ReaderConfig()))
    assert [(r[0], r[1], r[2]) for r in recs] == [(0, "", "ok one"), (1, "invalid_utf8", ""), (2, "", "ok two")]

    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": pa.array([b"bytes ok", b"\xff\xfe", None], pa.binary())}), tmp_path / "b.parquet")
    recs = list(read_file(InputFile(0, "parquet", str(tmp_path / "b.parquet"), "body"), ReaderConfig()))
    assert [(r[0], r[1], r[2]) for r in recs] == [(0, "", "bytes ok"), (1, "invalid_utf8", ""), (2, "missing_field", "")]
    pq.write_table(pa.table({"body": pa.array([1, 2], pa.int64())}), tmp_path / "i.parquet")
    (rec,) = read_file(InputFile(0, "parquet", str(tmp_path / "i.parquet"), "body"), ReaderConfig())
    assert rec[1] == "field_not_string"
    (tmp_path / "dir.jsonl").mkdir()
    (rec,) = read_file(InputFile(0, "jsonl", str(tmp_path / "dir.jsonl"), "text"), ReaderConfig())
    assert rec[1] == "unreadable" and "IsADirectoryError" in rec[3]


def test_read_tasks_group_files_in_order_by_bytes(tmp_path: Path) -> None:
    from pipelines.data.sources import InputFile, read_tasks

    sizes = {"a": 300, "b": 300, "c": 500, "d": 2000, "e": 100, "f": 100}
    for name, n in sizes.items():
        (tmp_path / name).write_bytes(b"x" * n)
    files = [InputFile(0, "text", str(tmp_path / name), "text") for name in sizes]
    files.insert(4, InputFile(0, "text", str(tmp_path / "gone"), "text"))  # cannot be stat'ed: 0 bytes
    tasks = read_tasks(files, bytes_per_task=1000)
    names = [[Path(f.path).name for f in t] for t in tasks]
    # a+b+c = 1100 > 1000 closes before c; d alone exceeds the target and is a task of its own.
    assert names == [["a", "b"], ["c"], ["d"], ["gone", "e", "f"]]
    assert [f for t in tasks for f in t] == files  # every file once, in order
    assert read_tasks([], 1000) == []
    # Too few tasks for the cluster: the target shrinks so every CPU gets one.
    assert len(read_tasks(files, bytes_per_task=10_000, min_tasks=4)) == 4


def test_staging_path_blocks_keep_order_and_bound_the_block_count(tmp_path: Path) -> None:
    """Files between phases reach the workers as blocks of paths, in order, 8 per block, and never
    more than MAX_BLOCKS blocks (a sort-based shuffle of M blocks moves M x M pieces)."""
    paths = [f"f{i:06d}" for i in range(20)]
    blocks = path_blocks(paths)
    assert [len(b) for b in blocks] == [8, 8, 4]
    many = [f"f{i:06d}" for i in range(MAX_BLOCKS * 8 + 1)]
    blocks = path_blocks(many)
    assert len(blocks) <= MAX_BLOCKS and sum(len(b) for b in blocks) == len(many)
    assert [p for b in blocks for p in b.column("path").to_pylist()] == many
    files = []
    for i in range(3):
        f = tmp_path / f"s{i}.parquet"
        pq.write_table(pa.table({"reason": ["", "binary_file", ""], "record": [3 * i, 3 * i + 1, 3 * i + 2],
                                         "source": [0] * 3, "path": [f"p{i}"] * 3, "excerpt": ["", "x", ""]}), f)
        files.append(str(f))
    rows = read_paths(pa.table({"path": files}), columns=["record"])
    assert rows.column("record").to_pylist() == list(range(9))
    out = tmp_path / "q.jsonl"
    head = [{"source": 1, "path": "gone/*", "record": -1, "reason": "unreadable_path", "excerpt": "none"}]
    assert write_bad_records(files, ["binary_file"], head, str(out)) == 4
    lines = out.read_text().splitlines()
    assert '"gone/*"' in lines[0] and [line.count('"binary_file"') for line in lines[1:]] == [1, 1, 1]
