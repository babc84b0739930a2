"""Elastic training without Ray: the layout of every world size, the constant global batch, the global
data order and its ledger, and checkpoints that are atomic, checksummed, fall back and keep the last K.
(The end-to-end runs on a real multi-node Ray are in test_elastic_e2e.py.)"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moe.checkpoint import CheckpointStore, read_extra, save_checkpoint
from moe.config import ConfigError
from moe.model import build_model
from pipelines.data.ingest import GlobalOrder, SampleLedger, SplitReader, index_split, rank_slice
from pipelines.train.config import layout_at, to_train_config
from pipelines.train.worker import PEAK_DIR, cached_matmul_peak
from tests.conftest import REPO


def _cfg(compose, *overrides: str):
    return to_train_config(compose("train", ["model=tiny", "data=tiny", *overrides]))


def test_every_size_of_the_range_has_a_layout_and_the_same_global_batch(compose) -> None:
    cfg = _cfg(compose, "parallel=ep2", "cluster.num_workers=2", "cluster.min_workers=1",
               "train.micro_batch_size=8")
    two, one = layout_at(cfg, 2), layout_at(cfg, 1)
    assert (two.dims.dp, two.dims.ep, two.accumulation) == (1, 2, 1)
    assert (one.dims.dp, one.dims.ep, one.accumulation) == (1, 1, 2)  # ep shrinks, accumulation makes up
    assert one.global_batch == two.global_batch == 16
    cfg = _cfg(compose, "parallel=pp2_ep2", "cluster.num_workers=4", "cluster.min_workers=1",
               "train.micro_batch_size=8", "train.global_batch_size=96")
    got = {w: (layout_at(cfg, w).dims.dp, layout_at(cfg, w).dims.ep, layout_at(cfg, w).dims.pp,
               layout_at(cfg, w).accumulation) for w in range(1, 5)}
    # largest ep <= 2 dividing the world and the experts, then the largest pp <= 2 dividing the rest
    assert got == {1: (1, 1, 1, 12), 2: (1, 2, 1, 6), 3: (3, 1, 1, 4), 4: (1, 2, 2, 6)}


def test_a_range_with_a_size_that_cannot_make_up_the_batch_is_a_config_error(compose) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(compose, "cluster.num_workers=4", "cluster.min_workers=2", "train.micro_batch_size=8")
    # default global batch 8 x 4 = 32; 3 workers would need 32 / (3 x 8)
    msg = str(err.value)
    assert "world sizes [3]" in msg and "train.global_batch_size to a multiple of 96" in msg, msg
    assert "cluster.min_workers" in msg
    cfg = _cfg(compose, "cluster.num_workers=4", "cluster.min_workers=2", "train.micro_batch_size=8",
               "train.global_batch_size=96")
    assert [layout_at(cfg, w).accumulation for w in (2, 3, 4)] == [6, 4, 3]


def _write_split(root: Path, n: int, rows_per_group: int, seq_len: int = 8) -> Path:
    """A split as preprocessing writes it (seq_id 0..n-1, two files), several row groups per file."""
    d = root / "train"
    d.mkdir(parents=True)
    ids = np.arange(n)
    tokens = [[int(i) % 97 + j for j in range(seq_len + 1)] for i in ids]
    half = n // 2
    for k, (lo, hi) in enumerate(((0, half), (half, n))):
        t = pa.table({"seq_id": pa.array(ids[lo:hi], pa.int64()),
                      "tokens": pa.array(tokens[lo:hi], pa.list_(pa.int32())),
                      "loss_mask": pa.array([[1] * (seq_len + 1)] * (hi - lo), pa.list_(pa.uint8()))})
        pq.write_table(t, d / f"part-{k:05d}.parquet", row_group_size=rows_per_group)
    return root


def test_global_order_is_a_function_of_seed_and_epoch_and_the_same_at_every_world_size(tmp_path: Path) -> None:
    groups = index_split(_write_split(tmp_path, 1000, 50), "train")
    assert len(groups) == 20 and [g.first for g in groups] == list(range(0, 1000, 50))
    order = GlobalOrder(groups, seed=7, global_batch=32, window=4)
    again = GlobalOrder(groups, seed=7, global_batch=32, window=4)
    e0, e1 = order.order(0).copy(), order.order(1).copy()
    assert np.array_equal(np.sort(e0), np.arange(1000)) and np.array_equal(e0, again.order(0))
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, GlobalOrder(groups, 8, 32, 4).order(0))
    assert order.steps_per_epoch == 31  # 1000 // 32: the last 8 of each epoch's order are left out
    for step in (0, 5, 30, 31, 45):
        ids = order.step_ids(step)
        assert np.array_equal(ids, again.step_ids(step))
        for ranks in (1, 2, 4):  # each data-parallel rank's slice, put back together, is the global batch
            assert np.array_equal(np.concatenate([rank_slice(ids, r, ranks) for r in range(ranks)]), ids)
    # streaming: a window of 4 row groups (200 sequences) is consumed before the next one starts
    first_window = {int(i) // 50 for i in e0[:200]}
    assert len(first_window) == 4


def test_split_reader_streams_row_groups_and_returns_exact_rows(tmp_path: Path) -> None:
    groups = index_split(_write_split(tmp_path, 1000, 50), "train")
    reader = SplitReader(groups, cache_groups=4)
    order = GlobalOrder(groups, seed=1, global_batch=40, window=2)
    for step in range(5):  # the first window holds 100 sequences: 2.5 steps
        batch = reader.read(order.step_ids(step))
        ids = order.step_ids(step)
        assert batch["seq_id"].tolist() == ids.tolist()
        assert torch.equal(batch["tokens"][:, 0], torch.from_numpy(ids % 97))
        assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert reader.row_groups_read == 4  # two windows of 2 row groups, each read once, not the whole split
    with pytest.raises(IndexError):
        reader.read(np.array([1000]))


def test_ledger_checks_against_the_order(tmp_path: Path) -> None:
    groups = index_split(_write_split(tmp_path, 200, 50), "train")
    order = GlobalOrder(groups, seed=3, global_batch=16, window=2)
    ledger = SampleLedger()
    for step in range(20):  # 12 steps per epoch: crosses into epoch 1
        ledger.record(step, order.step_ids(step)[::-1])
    assert ledger.check(order) == [] and ledger.sequences == 20 * 16
    ledger.save(tmp_path / "ledger.npy")
    back = SampleLedger.load(tmp_path / "ledger.npy")
    assert back.check(order) == [] and len(back) == 20
    bad = SampleLedger([*back.rows[:3], back.rows[1], *back.rows[4:]])  # step 3 trained step 1's batch again
    problems = bad.check(order)
    assert any(p.startswith("step 3:") for p in problems) and any("trained twice" in p for p in problems)


def _save(store: CheckpointStore, model, opt, step: int) -> Path:
    tmp = store.prepare(step)
    save_checkpoint(model, opt, tmp, {"trainer": {"step": step}}, rank=0)
    return store.commit(step)


def test_checkpoints_are_atomic_checksummed_fall_back_and_keep_the_last_k(compose, tmp_path: Path) -> None:
    cfg = _cfg(compose)
    model = build_model(cfg.model, device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters())
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    for step in (2, 4, 6):
        _save(store, model, opt, step)
    assert [p.name for p in store.committed()] == ["step_00000006", "step_00000004"]  # the last K
    # a save killed midway: its staging directory is never a checkpoint
    half = store.prepare(8)
    save_checkpoint(model, opt, half, {"trainer": {"step": 8}}, rank=0)
    path, skipped = store.latest_valid()
    assert path.name == "step_00000006" and skipped == []
    store.clean_staging()
    assert not half.exists()
    # damage the newest one: detected by its checksum, the previous one is used, the reason is given
    data = next((store.root / "step_00000006" / "dcp").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    path, skipped = store.latest_valid()
    assert path.name == "step_00000004" and len(skipped) == 1 and "does not match its checksum" in skipped[0]
    (store.root / "step_00000004" / "manifest.json").unlink()
    assert store.latest_valid() == (None, ["step_00000006: " + skipped[0].split(": ", 1)[1],
                                           "step_00000004: no manifest.json"])
    assert read_extra(store.root / "step_00000004") == {"trainer": {"step": 4}}


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.pt").write_bytes(b"")
    torch.save({"trainer": _Payload()}, tmp_path / "trainer_state.pt")
    with pytest.raises(pickle.UnpicklingError):
        read_extra(tmp_path)


def test_a_restarting_worker_does_not_import_mlflow() -> None:
    """Importing the worker is part of every restart's recovery; mlflow (about a second) is the controller's."""
    code = "import sys, pipelines.train.worker; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout[-2000:] + out.stderr[-2000:]


def test_the_matmul_peak_is_measured_once_per_run_and_host(tmp_path: Path) -> None:
    first = cached_matmul_peak(tmp_path)
    (cached,) = (tmp_path / PEAK_DIR).iterdir()
    assert first > 0 and json.loads(cached.read_text()) == {"flops": first}
    assert cached_matmul_peak(tmp_path) == first  # read back, not measured again
    cached.write_text("{broken")
    again = cached_matmul_peak(tmp_path)  # an unreadable cache is measured again and replaced
    assert again > 0 and json.loads(cached.read_text()) == {"flops": again}
