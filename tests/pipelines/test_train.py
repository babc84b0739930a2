"""End-to-end training on the shared local Ray: real Ray Train workers, gloo, Ray Data, MLflow.

One tiny run is checked for what a user reviews (params, metrics, pictures, registered model);
another has a worker killed mid-run and must resume from its checkpoint, losing nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from moe.checkpoint import load_model
from pipelines.core import tracking
from pipelines.train.config import to_train_config
from pipelines.train.driver import TrainingOutcome, run_training
from pipelines.train.plan import make_plan
from pipelines.train.timeline import PHASES

STEPS_OVERRIDES = ["train.micro_batch_size=8", "train.log_every=4", "train.eval_batches=2"]


def tiny_config(compose, tmp_path: Path, dataset_root: Path, *extra: str):
    overrides = ["model=tiny", "data=tiny", f"data.output_dir={dataset_root}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.storage_path={tmp_path / 'runs'}",
                 *STEPS_OVERRIDES, *extra]
    cfg = to_train_config(compose("train", overrides))
    return cfg, "resolved: test\n", make_plan(cfg)


def test_training_run_is_tracked_and_registered(ray_cluster, compose, tmp_path: Path, dataset_root: Path) -> None:
    cfg, yaml_text, plan = tiny_config(compose, tmp_path, dataset_root, "train.steps=24", "train.eval_every=12",
                                       "train.checkpoint_every=12", "optim.lr=0.005", "optim.warmup_steps=4")
    outcome = run_training(cfg, yaml_text, plan)
    assert outcome.steps == 24
    assert outcome.final_val_loss < outcome.initial_val_loss - 0.3, outcome

    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "64"
    assert run.data.params["model.moe.n_routed_experts"] == "8"
    assert run.data.params["cluster.backend"] == "gloo"
    losses = client.get_metric_history(outcome.run_id, "train/loss")
    assert [m.step for m in losses] == [4, 8, 12, 16, 20, 24]
    for key in ("perf/tokens_per_s", "perf/mfu", "train/lr", "train/grad_norm", "train/aux_loss",
                "moe/layer1/max_load", "moe/layer1/dropped_frac"):
        assert client.get_metric_history(outcome.run_id, key), key
    assert client.get_metric_history(outcome.run_id, "perf/mfu")[-1].value > 0
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)} | {
        a.path for d in ("plots", "config", "tokenizer", "model") for a in client.list_artifacts(outcome.run_id, d)}
    assert {"plots/loss_curves.png", "plots/expert_load_heatmap.png", "config/train.yaml",
            "model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= artifacts

    local = tracking.download_model(outcome.tracking_uri, name=cfg.tracking.registered_model,
                                    dst=tmp_path / "download")
    model = load_model(local)
    assert model.cfg.d_model == 64 and (local / "tokenizer.json").is_file()


def _checkpointed_steps(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("**/trainer_state.pt"))


def _kill_one_worker(started_after: float = 0.0) -> int:
    """SIGKILL one Ray Train worker process of this test session's Ray (a descendant of this process)
    started after `started_after` (a worker of an earlier run may still be exiting)."""
    import psutil

    workers = [p for p in psutil.Process(os.getpid()).children(recursive=True)
               if "RayTrainWorker" in " ".join(p.cmdline()) and p.create_time() >= started_after]
    assert workers, "no Ray Train worker process found"
    workers[-1].kill()
    return workers[-1].pid


def test_killed_worker_resumes_from_checkpoint_and_loses_nothing(ray_cluster, compose, tmp_path: Path,
                                                                  dataset_root: Path) -> None:
    steps = 60  # long enough that the kill below lands mid-run on a quiet machine (24 finished first)
    cfg, yaml_text, plan = tiny_config(compose, tmp_path, dataset_root, f"train.steps={steps}",
                                       "train.eval_every=200", "train.checkpoint_every=6", "train.max_failures=2")
    result: dict[str, TrainingOutcome | BaseException] = {}

    def target() -> None:
        try:
            result["outcome"] = run_training(cfg, yaml_text, plan)
        except BaseException as err:  # surfaced by the assertion below
            result["outcome"] = err

    thread = threading.Thread(target=target)
    started = time.time()
    thread.start()
    deadline = time.time() + 300
    # two checkpoints on disk: the first one has certainly been registered by the controller
    while len(_checkpointed_steps(tmp_path / "runs")) < 2 and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert len(_checkpointed_steps(tmp_path / "runs")) >= 2, "no checkpoint was written"
    _kill_one_worker(started_after=started)
    assert thread.is_alive(), "the run ended before the kill: the test needs more steps"
    thread.join(timeout=600)
    outcome = result["outcome"]
    assert isinstance(outcome, TrainingOutcome), outcome
    assert outcome.steps == steps

    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    consumed = client.get_metric_history(outcome.run_id, "data/consumed_sequences")
    tokens_seen = client.get_metric_history(outcome.run_id, "perf/tokens_seen")
    global_batch = plan.global_batch
    final_consumed = max(consumed, key=lambda m: (m.step, m.timestamp)).value
    # every step trained a global batch of distinct sequences: nothing repeated after the restart
    assert final_consumed == steps * global_batch
    assert max(tokens_seen, key=lambda m: (m.step, m.timestamp)).value == steps * global_batch * cfg.data.seq_len
    # the run resumed from a checkpoint (not from scratch: step 0 was evaluated once)
    assert max(m.value for m in client.get_metric_history(outcome.run_id, "train/restarts")) >= 1
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val/loss")].count(0) == 1
    # the restart event says where the restarted worker's time went, phase by phase, within the recovery
    events = [json.loads(Path(client.download_artifacts(outcome.run_id, a.path)).read_text())
              for a in client.list_artifacts(outcome.run_id, "events")]
    assert events and all(list(e["worker_phases"]) == list(PHASES) for e in events), events
    for e in events:
        assert all(v >= 0 for v in e["worker_phases"].values())
        assert e["interrupted_at"] < e["worker_started_at"] < e["next_step_at"] <= e["reported_at"]
        assert sum(e["worker_phases"].values()) <= e["seconds_to_next_step"] + 0.01  # rounding


def test_expert_parallel_training_logs_load_and_drops(ray_cluster, compose, tmp_path: Path,
                                                       dataset_root: Path) -> None:
    """`parallel.ep=2` trains through Ray Train; capacity mode drops tokens and says how many."""
    cfg, yaml_text, plan = tiny_config(compose, tmp_path, dataset_root, "parallel=ep2", "train.steps=8",
                                       "train.eval_every=8", "train.checkpoint_every=8",
                                       "model.moe.capacity_factor=1.0")
    assert (plan.dims.dp, plan.dims.ep) == (1, 2)
    outcome = run_training(cfg, yaml_text, plan)
    assert outcome.steps == 8
    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    dropped = client.get_metric_history(outcome.run_id, "moe/layer1/dropped_frac")
    assert dropped and all(0 < m.value < 1 for m in dropped)
    assert client.get_metric_history(outcome.run_id, "moe/layer1/max_load")[-1].value >= 1.0
    model = load_model(outcome.model_dir)  # exported from the EP-sharded checkpoint, all experts present
    assert model.layers["1"].ffn.experts.w1.shape[0] == cfg.model.moe.n_routed_experts


def test_mlflow_run_ends_failed_when_a_step_after_its_start_raises(ray_cluster, compose, tmp_path: Path,
                                                                   dataset_root: Path) -> None:
    """The driver's MLflow run is a context: an exception in fit, export or registration ends it FAILED."""
    from pipelines.train.driver import check_dataset, tracked_run

    cfg, yaml_text, plan = tiny_config(compose, tmp_path, dataset_root)
    with pytest.raises(RuntimeError, match="export broke"):
        with tracked_run(cfg, yaml_text, plan, check_dataset(cfg)) as run:
            raise RuntimeError("export broke")
    client = MlflowClient(tracking_uri=run.tracking_uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(run.run_id).data.params["model.d_model"] == "64"  # what was logged is kept
