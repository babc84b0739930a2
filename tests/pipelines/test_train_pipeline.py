"""Pipeline-parallel training end to end on the shared local Ray: `parallel=pp2` (the tiny model's two
layers: stage 0 holds the embedding and the dense layer, no experts; stage 1 the MoE layer and the
head) and `parallel=pp2_ep2` (4 workers) train through Ray Train, log a complete MLflow run and
export a one-process model from the stage-sharded checkpoint."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from moe.checkpoint import load_model
from pipelines.train.config import to_train_config
from pipelines.train.driver import run_training
from pipelines.train.plan import make_plan


def _run(compose, tmp_path: Path, dataset_root: Path, *overrides: str):
    """A tiny run on the session's preprocessed dataset (`dataset_root`, tests/pipelines/conftest.py)."""
    cfg = to_train_config(compose("train", [
        "model=tiny", "data=tiny", f"data.output_dir={dataset_root}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"train.storage_path={tmp_path / 'runs'}", "train.micro_batch_size=8", "train.log_every=4",
        "train.eval_batches=2", *overrides]))
    plan = make_plan(cfg)
    return cfg, plan, run_training(cfg, "resolved: test\n", plan)


def test_pp2_trains_through_ray_train_with_falling_validation_loss(ray_cluster, compose, tmp_path: Path,
                                                                   dataset_root: Path) -> None:
    steps = 16
    cfg, plan, outcome = _run(compose, tmp_path, dataset_root, "parallel=pp2", f"train.steps={steps}",
                              "train.eval_every=8", "train.checkpoint_every=8", "optim.lr=0.005",
                              "optim.warmup_steps=4")
    assert (plan.dims.pp, plan.dims.dp, plan.global_batch) == (2, 1, cfg.train.micro_batch_size)
    assert outcome.steps == steps
    assert outcome.final_val_loss < outcome.initial_val_loss - 0.2, outcome

    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.params["parallel.pp"] == "2"
    tokens_seen = client.get_metric_history(outcome.run_id, "perf/tokens_seen")
    assert max(m.value for m in tokens_seen) == steps * plan.global_batch * cfg.data.seq_len  # data ranks only
    consumed = client.get_metric_history(outcome.run_id, "data/consumed_sequences")
    assert max(m.value for m in consumed) == steps * plan.global_batch  # both stages' reads, each trained once
    for key in ("train/loss", "train/aux_loss", "train/grad_norm", "moe/layer1/max_load", "moe/layer1/dropped_frac"):
        assert client.get_metric_history(outcome.run_id, key), key
    assert client.get_metric_history(outcome.run_id, "train/aux_loss")[-1].value > 0  # gathered from stage 1
    artifacts = {a.path for d in ("plots", "model") for a in client.list_artifacts(outcome.run_id, d)}
    assert {"plots/expert_load_heatmap.png", "model/model.safetensors"} <= artifacts
    model = load_model(outcome.model_dir)  # the whole model, from both stages' checkpoint entries
    assert list(model.layers) == ["0", "1"] and model.tok_emb is not None and model.head is not None


def test_pp2_ep2_trains_on_four_workers(ray_cluster, compose, tmp_path: Path, dataset_root: Path) -> None:
    cfg, plan, outcome = _run(compose, tmp_path, dataset_root, "parallel=pp2_ep2", "cluster.num_workers=4",
                              "cluster.cpus_per_worker=0.5", "train.steps=4", "train.eval_every=4",
                              "train.checkpoint_every=4")
    assert (plan.dims.pp, plan.dims.ep, plan.global_batch) == (2, 2, 2 * cfg.train.micro_batch_size)
    assert outcome.steps == 4 and outcome.final_val_loss < outcome.initial_val_loss
    assert MlflowClient(tracking_uri=outcome.tracking_uri).get_run(outcome.run_id).info.status == "FINISHED"
    model = load_model(outcome.model_dir)  # experts of both EP ranks of stage 1
    assert model.layers["1"].ffn.experts.w1.shape[0] == cfg.model.moe.n_routed_experts


def test_pipeline_config_errors_stop_before_ray(compose) -> None:
    """A layout the schedule cannot run is a ConfigError naming the key and the fix (no Ray needed)."""
    import pytest

    from moe.config import ConfigError

    base = ["model=tiny", "data=tiny", "parallel=pp2"]
    for overrides, message in (
        (["parallel.pp_microbatches=1"], "set parallel.pp_microbatches>=2"),
        (["parallel.pp=4", "parallel.pp_microbatches=4", "cluster.num_workers=4"], "model.n_layers=2 cannot be split into 4 pipeline stages"),
        (["train.micro_batch_size=6", "parallel.pp_microbatches=4"], "not divisible by parallel.pp_microbatches=4"),
        (["parallel.pp_schedule=interleaved_1f1b"], "pp_virtual_stages=2"),
        (["parallel.pp_schedule=zb"], "parallel.pp_schedule='zb'"),
    ):
        with pytest.raises(ConfigError, match=message):
            to_train_config(compose("train", base + overrides))
