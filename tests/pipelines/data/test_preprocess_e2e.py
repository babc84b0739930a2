"""End to end on real stdlib files: the output contract training relies on, versioning and re-runs."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.data.ingest import read_manifest
from pipelines.data.manifest import list_versions
from pipelines.data.pipeline import run_preprocess
from pipelines.data.tokenizer import file_sha256, load_tokenizer


def _split_table(d: Path, split: str):
    return pq.read_table(sorted((d / split).glob("*.parquet")))


def test_output_contract(tiny_dataset: Path, tiny_cfg) -> None:
    m = read_manifest(tiny_dataset)
    seq_len = tiny_cfg.data.seq_len
    assert m["seq_len"] == seq_len == 64 and m["vocab_size"] == 512
    tok = load_tokenizer(tiny_dataset / m["tokenizer_file"])
    assert m["tokenizer_sha256"] == file_sha256(tiny_dataset / m["tokenizer_file"])
    assert tok.token_to_id("<|endoftext|>") == m["eos_id"] and tok.token_to_id("<|pad|>") == m["pad_id"]
    assert m["inputs"][0]["files"] == 40 and m["inputs"][0]["max_files"] == 40
    for split in ("train", "val"):
        t = _split_table(tiny_dataset, split)
        s = m["splits"][split]
        assert str(t.schema.field("seq_id").type) == "int64"
        assert str(t.schema.field("tokens").type) == "list<element: int32>"
        assert str(t.schema.field("loss_mask").type) == "list<element: uint8>"
        n = t.num_rows
        assert n == s["sequences"] > 0
        assert t.column("seq_id").to_pylist() == list(range(n))
        tokens = np.array(t.column("tokens").to_pylist())
        mask = np.array(t.column("loss_mask").to_pylist())
        assert tokens.shape == mask.shape == (n, seq_len + 1)
        assert int(mask.sum()) == s["tokens"]
        assert tokens.max() < m["vocab_size"] and tokens.min() >= 0
        assert np.all(tokens[mask == 0] == m["pad_id"]) and not np.any(tokens[mask == 1] == m["pad_id"])
        # padding only at the end of a row: the mask never goes 0 -> 1
        assert not np.any((mask[:, 1:] == 1) & (mask[:, :-1] == 0))
        # one EOS closes every document
        assert int((tokens[mask == 1] == m["eos_id"]).sum()) == s["documents_weighted"]
    text = tok.decode(_split_table(tiny_dataset, "train").column("tokens")[0].as_py())
    assert len(text) > 50  # real stdlib source decodes back to text
    counts = m["records"]
    dropped = sum(m["bad_input"].values()) + sum(m["filtered"].values())
    assert counts["read"] == counts["good"] + dropped
    assert counts["kept"] == m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]


def test_rerun_reuses_and_force_rebuilds_identically(tiny_dataset: Path, tiny_cfg) -> None:
    assert run_preprocess(tiny_cfg) == tiny_dataset  # same config and inputs: reused, nothing rebuilt
    rebuilt = run_preprocess(dataclasses.replace(tiny_cfg, force=True))
    assert rebuilt != tiny_dataset and rebuilt.name.startswith("v0002-")
    a, b = read_manifest(tiny_dataset), read_manifest(rebuilt)
    assert a["key"] == b["key"] and a["tokenizer_sha256"] == b["tokenizer_sha256"]
    for split in ("train", "val"):
        assert _split_table(tiny_dataset, split).equals(_split_table(rebuilt, split))  # deterministic output
        files = sorted(p.name for p in (tiny_dataset / split).glob("*.parquet"))
        assert files == sorted(p.name for p in (rebuilt / split).glob("*.parquet"))
        for name in files:  # written by workers, byte for byte the same
            assert (tiny_dataset / split / name).read_bytes() == (rebuilt / split / name).read_bytes()
    root = Path(tiny_cfg.data.output_dir)
    assert [p.name for _, _, p in list_versions(root)] == [tiny_dataset.name, rebuilt.name]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_no_input_at_all_is_a_clear_error(preprocess_cfg, tmp_path: Path) -> None:
    from pipelines.data.pipeline import NoUsableInputError

    cfg = preprocess_cfg(tmp_path / "out", f"data.sources=[{{kind:jsonl,path:{tmp_path}/none/*.jsonl}}]")
    with pytest.raises(NoUsableInputError, match=r"data.sources\[0\]: kind=jsonl .*none/\*\.jsonl"):
        run_preprocess(cfg)


def test_tokenizer_pool_larger_than_the_cluster_is_refused(ray_cluster, preprocess_cfg, tmp_path: Path) -> None:
    """Each tokenizer actor holds a CPU; a pool that cannot start would leave phase D waiting forever."""
    import ray

    from pipelines.data.pipeline import ClusterTooSmallError

    cpus = int(ray.cluster_resources()["CPU"])
    cfg = preprocess_cfg(tmp_path / "out", f"runtime.tokenize_actors={cpus + 1}")
    with pytest.raises(ClusterTooSmallError, match=rf"runtime.tokenize_actors={cpus + 1} needs a Ray cluster with "
                                                   rf"at least {cpus + 1} CPUs .* this one has {cpus}\. Lower"):
        run_preprocess(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_small_corpus_starts_no_idle_tokenizer_actor(ray_cluster, preprocess_cfg, tmp_path: Path) -> None:
    """Fewer work units than `runtime.tokenize_actors`: the pool has one actor per unit, so none
    starts only to sit idle (Ray Data warns when an actor pool is larger than its input)."""
    cfg = preprocess_cfg(tmp_path / "out", "data.sources=[{kind:stdlib,max_files:5}]", "runtime.tokenize_actors=2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_preprocess(cfg)
    assert not [w for w in caught if "TokenizeUnits" in str(w.message)], [str(w.message) for w in caught]
    m = read_manifest(out)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] <= 5  # one packing batch, one unit
    assert m["splits"]["train"]["sequences"] > 0
