"""Training ingest: dataset resolution, disjoint worker shards, stream position save/restore across worker counts."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data.ingest import ConsumedSet, iter_batches, read_manifest, resolve_dataset_dir, split_dataset


def _all_ids(ds) -> np.ndarray:
    return np.sort(np.concatenate([b["seq_id"] for b in ds.iter_batches(batch_size=4096, batch_format="numpy")]))


def _run_workers(ds, n: int, batch_size: int, consumed: ConsumedSet, equal: bool = False,
                 stop_after: int | None = None) -> list[list[np.ndarray]]:
    """Iterate `n` streaming-split shards concurrently (as Ray Train workers do); per worker, the seq_id batches."""
    shards = ds.streaming_split(n, equal=equal)
    seen: list[list[np.ndarray]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            for i, batch in enumerate(iter_batches(shards[rank], batch_size, consumed)):
                assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
                assert batch["tokens"].shape == batch["loss_mask"].shape and batch["tokens"].shape[0] == batch_size
                if stop_after is None or i < stop_after:
                    seen[rank].append(batch["seq_id"].numpy())
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return seen


@pytest.fixture(scope="module")
def small_dir(tiny_dataset: Path, tmp_path_factory) -> Path:
    """The first train shard (1000 sequences) of the tiny dataset as its own output: quick to iterate row by row."""
    d = tmp_path_factory.mktemp("small") / tiny_dataset.name
    (d / "train").mkdir(parents=True)
    shutil.copy(tiny_dataset / "train" / "part-00000.parquet", d / "train")
    m = read_manifest(tiny_dataset)
    m["splits"]["train"]["sequences"] = pq.read_metadata(d / "train" / "part-00000.parquet").num_rows
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_resolve_latest_named_and_missing(tiny_dataset: Path, tiny_cfg, tmp_path: Path) -> None:
    assert resolve_dataset_dir(tiny_cfg.data) == tiny_dataset
    named = dataclasses.replace(tiny_cfg.data, version=tiny_dataset.name)
    assert resolve_dataset_dir(named) == tiny_dataset
    with pytest.raises(FileNotFoundError, match="python -m pipelines.preprocess"):
        resolve_dataset_dir(dataclasses.replace(tiny_cfg.data, output_dir=str(tmp_path / "nothing")))
    with pytest.raises(FileNotFoundError, match="v9999-000000000000"):
        resolve_dataset_dir(dataclasses.replace(tiny_cfg.data, version="v9999-000000000000"))
    m = read_manifest(tiny_dataset)
    assert m["version"] == tiny_dataset.name and (tiny_dataset / m["tokenizer_file"]).is_file()


def test_consumed_set_state_dict_round_trip() -> None:
    c = ConsumedSet(1003)
    c.add(np.array([0, 5, 1002], dtype=np.int64))
    c.add(torch.tensor([7, 5], dtype=torch.int64))
    assert len(c) == 4
    state = pickle.loads(pickle.dumps(c.state_dict()))
    assert len(state["bits"]) == (1003 + 7) // 8  # a bitmap: small for any epoch size
    r = ConsumedSet.from_state_dict(state)
    assert len(r) == 4 and r.n_sequences == 1003
    assert r.contains(np.arange(1003)).nonzero()[0].tolist() == [0, 5, 7, 1002]
    other = ConsumedSet(1003)
    other.add(np.array([1, 2]))
    r.update(other)
    assert len(r) == 6
    with pytest.raises(IndexError):
        r.add(np.array([1003]))
    with pytest.raises(ValueError):
        r.update(ConsumedSet(10))


def test_two_worker_shards_are_disjoint(tiny_dataset: Path) -> None:
    ds = split_dataset(tiny_dataset, "train")
    n = read_manifest(tiny_dataset)["splits"]["train"]["sequences"]
    assert n > 1000  # several shards
    assert np.array_equal(_all_ids(ds), np.arange(n))
    batch_size = 16
    seen = _run_workers(ds, 2, batch_size, ConsumedSet(n), equal=True)  # what Ray Train's get_dataset_shard does
    per_rank = [np.concatenate(s) for s in seen]
    assert all(len(p) > 0 for p in per_rank)
    assert len(np.intersect1d(per_rank[0], per_rank[1])) == 0
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == len(union)
    # only each rank's last partial batch (and, with equal=True, at most one row per rank) is left out
    assert n - len(union) < 2 * batch_size + 2


@pytest.mark.parametrize("new_workers", [1, 3])
def test_resume_with_other_worker_count_neither_repeats_nor_skips(small_dir: Path, new_workers: int) -> None:
    n = read_manifest(small_dir)["splits"]["train"]["sequences"]
    assert n == 1000
    ds = split_dataset(small_dir, "train").materialize()
    # Run 1: two workers train 5 steps of 8 sequences, then a checkpoint records what all ranks consumed.
    first = _run_workers(ds, 2, 8, ConsumedSet(n), equal=True, stop_after=5)
    consumed = ConsumedSet(n)
    for rank_batches in first:
        for ids in rank_batches:
            consumed.add(ids)
    assert len(consumed) == 2 * 5 * 8
    restored = ConsumedSet.from_state_dict(pickle.loads(pickle.dumps(consumed.state_dict())))
    # Run 2 with a different worker count: exactly the not-yet-consumed sequences (batch_size 1: no partial batch).
    second = np.concatenate([np.concatenate(s) for s in _run_workers(ds, new_workers, 1, restored) if s])
    assert len(np.unique(second)) == len(second), "a sequence was repeated"
    expected = np.setdiff1d(np.arange(n), np.flatnonzero(consumed.contains(np.arange(n))))
    assert np.array_equal(np.sort(second), expected), "a sequence was skipped or repeated"
    # With a real batch size only each rank's last partial batch may be left for the next epoch.
    third = [np.concatenate(s) for s in _run_workers(ds, new_workers, 8, restored, equal=True) if s]
    third_all = np.concatenate(third)
    assert len(np.unique(third_all)) == len(third_all)
    assert not consumed.contains(third_all).any()
    assert len(expected) - len(third_all) < new_workers * (8 + 1)
