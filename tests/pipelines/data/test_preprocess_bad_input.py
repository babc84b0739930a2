"""Bad input never crashes and never loses good data: exact counts by reason, every good record survives.

One corpus mixes text files, JSONL (weight 2) and Parquet with every kind of bad input next to
good records in the same files; the packed output is decoded back and compared with the input.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.clean import normalize_text
from pipelines.data.config import NormalizeConfig
from pipelines.data.ingest import read_manifest
from pipelines.data.pipeline import NoUsableInputError, run_preprocess
from pipelines.data.tokenizer import load_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap", "shlex", "fnmatch", "glob", "bisect", "heapq", "colorsys", "calendar", "difflib", "pprint",
           "queue", "sched"]


def _good_texts() -> list[str]:
    return [(STDLIB / f"{m}.py").read_text(encoding="utf-8")[:1500] for m in MODULES]


def _make_corpus(root: Path) -> tuple[list[str], list[str], list[str]]:
    """-> (text-file docs, JSONL docs, Parquet docs), the good records written among the bad ones."""
    good = _good_texts()
    text_docs, jsonl_docs, pq_docs = good[:3], good[3:8], good[8:11]
    docs = root / "docs"
    docs.mkdir(parents=True)
    for i, t in enumerate(text_docs):
        (docs / f"good{i}.txt").write_text(t)
    (docs / "empty.txt").write_bytes(b"")
    (docs / "blob.bin").write_bytes(bytes(range(256)) * 64)
    (docs / "latin1.txt").write_bytes(("caf\u00e9 " * 40).encode("latin-1"))
    os.symlink(root / "does-not-exist.txt", docs / "broken-link.txt")
    lines = [json.dumps({"body": jsonl_docs[0], "id": 0}).encode(),
             b'{"body": "truncated',
             json.dumps({"other": "no body here"}).encode(),
             json.dumps({"body": jsonl_docs[1]}).encode(),
             b'{"body": "caf\xe9 invalid utf-8"}',
             b"[1, 2, 3]",
             json.dumps({"body": 12345}).encode(),
             json.dumps({"body": jsonl_docs[2]}).encode(),
             b'{"body": "' + b"A" * 50_000_000 + b'"}',  # a single 50 MB line
             json.dumps({"body": jsonl_docs[3]}).encode(),
             b"   ",
             json.dumps({"body": jsonl_docs[4]}).encode()]
    (root / "records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.table({"content": [pq_docs[0], None, pq_docs[1], pq_docs[2]]}), root / "table.parquet")
    pq.write_table(pa.table({"other": ["x" * 100]}), root / "nocol.parquet")
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet")
    return text_docs, jsonl_docs, pq_docs


EXPECTED_BAD = {"empty_file": 1, "binary_file": 1, "invalid_utf8": 2, "unreadable": 2, "malformed_json": 1,
                "missing_field": 3, "not_an_object": 1, "field_not_string": 1, "record_too_large": 1,
                "unreadable_path": 1}


def _decoded_docs(d: Path, split: str) -> list[str]:
    m = read_manifest(d)
    tok = load_tokenizer(d / m["tokenizer_file"])
    t = pq.read_table(sorted((d / split).glob("*.parquet")))
    if t.num_rows == 0:
        return []
    tokens = np.array(t.column("tokens").to_pylist())
    mask = np.array(t.column("loss_mask").to_pylist()).astype(bool)
    ids = tokens[mask].tolist()  # the split's token stream in order, padding removed
    docs, cur = [], []
    for i in ids:
        if i == m["eos_id"]:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert not cur, "every document ends with EOS"
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, tuple[list[str], list[str], list[str]]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, _make_corpus(root)


def _cfg(preprocess_cfg, root: Path, *extra: str):
    sources = (f"data.sources=[{{kind:text,path:{root}/docs}},{{kind:jsonl,path:{root}/records.jsonl,field:body,"
               f"weight:2.0}},{{kind:parquet,path:'{root}/*.parquet',field:content}},"
               f"{{kind:jsonl,path:{root}/missing/*.jsonl}}]")
    return preprocess_cfg(root / "out", sources, "data.val_fraction=0.2", "dedup.near=false", *extra)


def test_bad_input_counted_good_records_preserved(ray_cluster, preprocess_cfg, corpus) -> None:
    root, (text_docs, jsonl_docs, pq_docs) = corpus
    out = run_preprocess(_cfg(preprocess_cfg, root))
    m = read_manifest(out)
    assert m["bad_input"] == EXPECTED_BAD
    assert m["records"]["good"] == m["records"]["kept"] == 11
    assert sum(m["filtered"].values()) == 0
    quarantined = [json.loads(line) for line in (out / m["quarantine_file"]).read_text().splitlines()]
    assert Counter(q["reason"] for q in quarantined) == Counter(EXPECTED_BAD)
    big = next(q for q in quarantined if q["reason"] == "record_too_large")
    assert big["record"] == 8 and big["path"].endswith("records.jsonl") and len(big["excerpt"]) < 1000

    norm = NormalizeConfig()
    weights = {t: 1 for t in text_docs + pq_docs} | {t: 2 for t in jsonl_docs}
    train, val = _decoded_docs(out, "train"), _decoded_docs(out, "val")
    expected_train: Counter[str] = Counter()
    for t, w in weights.items():
        if normalize_text(t, norm)[0] not in val:
            expected_train[normalize_text(t, norm)[0]] += w
    assert Counter(train) == expected_train  # every good record, jsonl ones twice (weight 2.0), in train or val
    assert sorted(val + list(set(train))) == sorted(normalize_text(t, norm)[0] for t in weights)
    assert m["splits"]["train"]["documents_weighted"] == sum(expected_train.values())
    assert [i["files"] for i in m["inputs"]] == [7, 1, 3, 0]


def test_changed_input_writes_new_version(ray_cluster, preprocess_cfg, corpus) -> None:
    root, _ = corpus
    first = run_preprocess(_cfg(preprocess_cfg, root))  # reused from the previous test when it ran
    assert run_preprocess(_cfg(preprocess_cfg, root)) == first
    extra = (STDLIB / "sched.py").read_text(encoding="utf-8")[1500:3500]
    with (root / "records.jsonl").open("a") as fh:
        fh.write(json.dumps({"body": extra}) + "\n")
    second = run_preprocess(_cfg(preprocess_cfg, root))
    assert second != first and second.parent == first.parent
    a, b = read_manifest(first), read_manifest(second)
    assert a["config_hash"] == b["config_hash"] and a["inputs"][1]["sha256"] != b["inputs"][1]["sha256"]
    assert b["records"]["good"] == a["records"]["good"] + 1
    # a changed config is a new version too
    third = run_preprocess(_cfg(preprocess_cfg, root, "filters.max_chars=1800"))
    c = read_manifest(third)
    assert third not in (first, second) and c["config_hash"] != b["config_hash"]
    assert c["filtered"]["too_long"] == 1 and c["records"]["kept"] == b["records"]["kept"] - 1


def test_everything_filtered_is_a_clear_error(ray_cluster, preprocess_cfg, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.txt").write_text(f"tiny {i}\n")
    (tmp_path / "in" / "empty.txt").write_text("")
    cfg = preprocess_cfg(tmp_path / "out", f"data.sources=[{{kind:text,path:{tmp_path}/in}}]")
    with pytest.raises(NoUsableInputError) as e:
        run_preprocess(cfg)
    msg = str(e.value)
    assert "data.sources[0]: kind=text" in msg and "'too_short': 3" in msg and "'empty_file': 1" in msg
    assert "filters.min_chars=64" in msg
    assert not list((tmp_path / "out").glob("v*")) and not list((tmp_path / "out").glob(".tmp*"))
