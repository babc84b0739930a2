"""Training ingest on a real preprocessed dataset: dataset resolution, the row-group index and exact reads.
(The global order, rank slices, streaming and the ledger on synthetic shards: tests/pipelines/test_elastic.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.ingest import GlobalOrder, SplitReader, index_split, read_manifest, resolve_dataset_dir


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


def test_the_real_split_is_indexed_by_row_group_and_read_back_exactly(tiny_dataset: Path) -> None:
    """What preprocessing writes is what training reads: every seq_id once, rows equal to the Parquet rows."""
    n = read_manifest(tiny_dataset)["splits"]["train"]["sequences"]
    groups = index_split(tiny_dataset, "train")
    assert len(groups) >= 2 and sum(g.rows for g in groups) == n and groups[0].first == 0
    table = pq.read_table(tiny_dataset / "train", columns=["seq_id", "tokens", "loss_mask"]).sort_by("seq_id")
    order = GlobalOrder(groups, seed=0, global_batch=64, window=1)
    ids = order.step_ids(3)
    batch = SplitReader(groups, cache_groups=1).read(ids)
    expected = table.take(pa.array(ids))
    assert batch["seq_id"].tolist() == ids.tolist()
    assert batch["tokens"].tolist() == expected.column("tokens").to_pylist()
    assert batch["loss_mask"].tolist() == [[float(x) for x in row] for row in expected.column("loss_mask").to_pylist()]
    # window=1: each step's batch comes from one row group (or two at a window's edge)
    assert len({int(np.searchsorted([g.first for g in groups], i, side="right")) for i in ids}) <= 2
