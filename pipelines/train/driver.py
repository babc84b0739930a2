"""One training run, driver side: dataset and cluster checks, the MLflow run, the Ray Train
TorchTrainer, then export, model registration and the run's pictures.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import ray.data
from mlflow import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train import DataConfig as RayDataConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.profiles import worker_resources
from cluster.runtime import ClusterMismatchError, connect
from moe.checkpoint import export_model
from pipelines.checkpointing import load_full_model
from pipelines.core import tracking
from pipelines.data.ingest import read_manifest, resolve_dataset_dir, split_dataset
from pipelines.train.config import TrainConfig
from pipelines.train.plan import TrainingPlan
from pipelines.train.progress import TrainProgress
from pipelines.train.report import expert_load_heatmap, loss_curves
from pipelines.train.worker import train_loop_per_worker


class TrainingFailed(RuntimeError):
    """The run could not start or did not finish; the message says why and what to do."""


@dataclass
class TrainingOutcome:
    run_id: str | None
    tracking_uri: str | None
    model_dir: Path
    model_version: int | None
    steps: int
    initial_val_loss: float
    final_val_loss: float
    final_train_loss: float

    def summary_lines(self) -> list[str]:
        lines = [f"finished {self.steps} steps: train loss {self.final_train_loss:.4f}, "
                 f"val loss {self.initial_val_loss:.4f} -> {self.final_val_loss:.4f}",
                 f"model exported to {self.model_dir}"]
        if self.run_id:
            lines.append(f"MLflow run {self.run_id} in {self.tracking_uri}; registered version {self.model_version}")
            lines.append(f"view it: mlflow ui --backend-store-uri {self.tracking_uri}")
        return lines


def _check_dataset(cfg: TrainConfig) -> tuple[Path, dict]:
    try:
        dataset_dir = resolve_dataset_dir(cfg.data)
    except FileNotFoundError as err:
        raise TrainingFailed(str(err)) from err
    manifest = read_manifest(dataset_dir)
    if manifest["seq_len"] != cfg.data.seq_len:
        raise TrainingFailed(
            f"dataset {dataset_dir} was packed with seq_len={manifest['seq_len']} but data.seq_len={cfg.data.seq_len}; "
            f"run `python -m pipelines.preprocess data.seq_len={cfg.data.seq_len}` or set data.seq_len={manifest['seq_len']}."
        )
    if manifest["vocab_size"] > cfg.model.vocab_size:
        raise TrainingFailed(
            f"the dataset's tokenizer has {manifest['vocab_size']} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size>={manifest['vocab_size']}."
        )
    if manifest["splits"]["train"]["sequences"] < cfg.train.micro_batch_size * cfg.cluster.num_workers:
        raise TrainingFailed(
            f"dataset {dataset_dir} has {manifest['splits']['train']['sequences']} training sequences, fewer than one "
            f"global batch ({cfg.train.micro_batch_size} x {cfg.cluster.num_workers} workers); add data or "
            "lower train.micro_batch_size."
        )
    return dataset_dir, manifest


def _metric_series(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def run_training(cfg: TrainConfig, resolved_yaml: str, plan: TrainingPlan) -> TrainingOutcome:
    try:
        runtime = connect(cfg.cluster)
    except ClusterMismatchError as err:
        raise TrainingFailed(str(err)) from err
    try:
        dataset_dir, manifest = _check_dataset(cfg)
    except TrainingFailed:
        if runtime.started_locally:
            ray.shutdown()
        raise
    if runtime.dashboard_url:
        print(f"Ray dashboard: {runtime.dashboard_url}", flush=True)

    run_id = tracking_uri = None
    if cfg.tracking.enabled:
        tracking_uri = tracking.configure(cfg.tracking)
        run = mlflow.start_run(run_name=cfg.tracking.run_name)
        run_id = run.info.run_id
        tracking.log_params(tracking.flatten(cfg))
        mlflow.log_params({"plan.global_batch": plan.global_batch, "plan.total_params": plan.total_params,
                           "plan.active_params": plan.active_params, "data.dataset_dir": str(dataset_dir)})
        mlflow.log_text(resolved_yaml, "config/train.yaml")
        mlflow.log_dict(manifest, "data/manifest.json")
        mlflow.log_artifact(str(dataset_dir / manifest["tokenizer_file"]), "tokenizer")
        mlflow.set_tags({"cluster": cfg.cluster.name, "model": cfg.model.name, "dataset_version": manifest["version"]})

    # the datasets carry this context to the workers: progress lines, not Ray Data's bars, on the console
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage = Path(cfg.train.storage_path).resolve()
    name = f"train-{run_id or 'local'}"
    n_workers: int | tuple[int, int] = cfg.cluster.num_workers
    if cfg.cluster.min_workers is not None:
        n_workers = (cfg.cluster.min_workers, cfg.cluster.num_workers)
    resources = worker_resources(cfg.cluster)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "n_train_sequences": manifest["splits"]["train"]["sequences"],
                           "n_val_sequences": manifest["splits"]["val"]["sequences"]},
        torch_config=TorchConfig(backend=cfg.cluster.backend),
        scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=cfg.cluster.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TrainProgress(tracking_uri, run_id, cfg.train.steps)],
        ),
        datasets={"train": split_dataset(dataset_dir, "train").randomize_block_order(seed=cfg.train.seed),
                  "val": split_dataset(dataset_dir, "val")},
        dataset_config=RayDataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        if run_id:
            mlflow.end_run(status="FAILED")
        raise TrainingFailed(f"training failed: {err}") from err
    finally:
        if runtime.started_locally:
            ray.shutdown()

    final = result.metrics or {}
    if result.checkpoint is None:
        raise TrainingFailed("training finished without a checkpoint; nothing to export.")
    with result.checkpoint.as_directory() as ckpt_dir:
        model = load_full_model(cfg.model, Path(ckpt_dir))
    model_dir = storage / name / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    export_model(model, model_dir, tokenizer_path=dataset_dir / manifest["tokenizer_file"])

    version = None
    initial_val = final_val = math.nan
    if run_id:
        client = MlflowClient(tracking_uri=tracking_uri)
        val = _metric_series(client, run_id, "val/loss")
        if val:
            initial_val, final_val = min(val)[1], max(val)[1]
        curves = loss_curves({"train/loss": _metric_series(client, run_id, "train/loss"), "val/loss": val})
        mlflow.log_figure(curves, "plots/loss_curves.png")
        if final.get("expert_load"):
            heat = expert_load_heatmap(final["expert_load"], final["moe_layers"])
            mlflow.log_figure(heat, "plots/expert_load_heatmap.png")
        version = tracking.register_model_dir(model_dir, cfg.tracking.registered_model, run_id)
        mlflow.end_run()
    return TrainingOutcome(run_id=run_id, tracking_uri=tracking_uri, model_dir=model_dir, model_version=version,
                           steps=int(final.get("step", 0)), initial_val_loss=initial_val, final_val_loss=final_val,
                           final_train_loss=float(final.get("train/loss", math.nan)))
