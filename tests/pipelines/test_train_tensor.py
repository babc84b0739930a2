"""Tensor-parallel training end to end on the shared local Ray: `parallel=tp2` with
`train.activation_checkpointing=moe` trains through Ray Train (both tp ranks read the same batch),
the validation loss falls, and the tp-sharded checkpoint exports a one-process model."""

from __future__ import annotations

from pathlib import Path

from moe.checkpoint import load_model
from pipelines.train.config import to_train_config
from pipelines.train.driver import run_training
from pipelines.train.plan import make_plan


def test_tp2_with_recomputation_trains_through_ray_train(ray_cluster, compose, tmp_path: Path,
                                                         dataset_root: Path) -> None:
    cfg = to_train_config(compose("train", [
        "model=tiny", "data=tiny", f"data.output_dir={dataset_root}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"train.storage_path={tmp_path / 'runs'}", "train.micro_batch_size=8", "train.log_every=4",
        "train.eval_batches=2", "parallel=tp2", "train.activation_checkpointing=moe", "train.steps=8",
        "train.eval_every=8", "train.checkpoint_every=8", "optim.lr=0.005", "optim.warmup_steps=2"]))
    plan = make_plan(cfg)
    assert (plan.dims.tp, plan.dims.dp, plan.global_batch) == (2, 1, 8)
    outcome = run_training(cfg, "resolved: test\n", plan)
    assert outcome.steps == 8 and outcome.final_val_loss < outcome.initial_val_loss - 0.1, outcome
    model = load_model(outcome.model_dir)  # whole attention and feed-forward weights from both tp shards
    assert model.layers["0"].attn.wq.weight.shape == (cfg.model.d_model, cfg.model.d_model)
