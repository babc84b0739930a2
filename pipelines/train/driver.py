"""One training run, driver side, in this order:

    connect   start a local Ray or connect to the profile's cluster (cluster.runtime), check resources
    check     the dataset exists and matches the config (seq_len, vocabulary, enough sequences)
    track     an MLflow run as a context: params, config, manifest, tokenizer; ended FAILED on any
              exception below, export and registration included
    fit       a Ray Train TorchTrainer running `pipelines.train.worker.Trainer` on every worker
    export    the final checkpoint as a one-process model directory (moe.checkpoint), and beside it
              the stock transformers directory (moe.hf) when a stock class represents the model
    register  plots, the model logged under the run and registered as a new version, the
              transformers directory logged as artifact `hf`
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.data
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train import DataConfig as RayDataConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tokenizers import Tokenizer

from cluster.profiles import worker_resources
from cluster.runtime import ClusterMismatchError, connect
from moe.checkpoint import export_model, load_full_model
from moe.hf import UnsupportedModelError, export_hf
from moe.model import MoETransformer
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


@dataclass
class Dataset:
    """The preprocessed dataset a run trains on."""

    path: Path
    manifest: dict[str, Any]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer_file"]

    def sequences(self, split: str) -> int:
        return int(self.manifest["splits"][split]["sequences"])


@dataclass
class TrackedRun:
    """The MLflow run of a training (ids are None when tracking is off)."""

    run_id: str | None
    tracking_uri: str | None


def check_dataset(cfg: TrainConfig) -> Dataset:
    """The dataset the config points at; TrainingFailed names any mismatch and the fix."""
    try:
        dataset_dir = resolve_dataset_dir(cfg.data)
    except FileNotFoundError as err:
        raise TrainingFailed(str(err)) from err
    ds = Dataset(dataset_dir, read_manifest(dataset_dir))
    m = ds.manifest
    if m["seq_len"] != cfg.data.seq_len:
        raise TrainingFailed(
            f"dataset {dataset_dir} was packed with seq_len={m['seq_len']} but data.seq_len={cfg.data.seq_len}; "
            f"run `python -m pipelines.preprocess data.seq_len={cfg.data.seq_len}` or set data.seq_len={m['seq_len']}."
        )
    if m["vocab_size"] > cfg.model.vocab_size:
        raise TrainingFailed(
            f"the dataset's tokenizer has {m['vocab_size']} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size>={m['vocab_size']}."
        )
    if ds.sequences("train") < cfg.train.micro_batch_size * cfg.cluster.num_workers:
        raise TrainingFailed(
            f"dataset {dataset_dir} has {ds.sequences('train')} training sequences, fewer than one "
            f"global batch ({cfg.train.micro_batch_size} x {cfg.cluster.num_workers} workers); add data or "
            "lower train.micro_batch_size."
        )
    return ds


@contextmanager
def tracked_run(cfg: TrainConfig, resolved_yaml: str, plan: TrainingPlan, ds: Dataset) -> Iterator[TrackedRun]:
    """An MLflow run with the run's params and inputs; FINISHED on success, FAILED on any exception."""
    if not cfg.tracking.enabled:
        yield TrackedRun(None, None)
        return
    import mlflow

    uri = tracking.configure(cfg.tracking)
    with mlflow.start_run(run_name=cfg.tracking.run_name) as run:  # ends FAILED if the body raises
        tracking.log_params(tracking.flatten(cfg))
        mlflow.log_params({"plan.global_batch": plan.global_batch, "plan.total_params": plan.total_params,
                           "plan.active_params": plan.active_params, "data.dataset_dir": str(ds.path)})
        mlflow.log_text(resolved_yaml, "config/train.yaml")
        mlflow.log_dict(ds.manifest, "data/manifest.json")
        mlflow.log_artifact(str(ds.tokenizer_path), "tokenizer")
        mlflow.set_tags({"cluster": cfg.cluster.name, "model": cfg.model.name,
                         "dataset_version": ds.manifest["version"]})
        yield TrackedRun(run.info.run_id, uri)


def make_trainer(cfg: TrainConfig, ds: Dataset, run: TrackedRun, name: str) -> TorchTrainer:
    """The Ray Train TorchTrainer: elastic scaling from the profile, failures, checkpoints, datasets."""
    n_workers: int | tuple[int, int] = cfg.cluster.num_workers
    if cfg.cluster.min_workers is not None:
        n_workers = (cfg.cluster.min_workers, cfg.cluster.num_workers)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "n_train_sequences": ds.sequences("train"),
                           "n_val_sequences": ds.sequences("val")},
        torch_config=TorchConfig(backend=cfg.cluster.backend),
        scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=cfg.cluster.gpus_per_worker > 0,
                                     resources_per_worker=worker_resources(cfg.cluster)),
        run_config=RunConfig(
            name=name, storage_path=str(Path(cfg.train.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TrainProgress(run.tracking_uri, run.run_id, cfg.train.steps)],
        ),
        datasets={"train": split_dataset(ds.path, "train").randomize_block_order(seed=cfg.train.seed),
                  "val": split_dataset(ds.path, "val")},
        dataset_config=RayDataConfig(datasets_to_split=["train"]),
    )


def fit(cfg: TrainConfig, ds: Dataset, run: TrackedRun, name: str) -> Result:
    # the datasets carry this context to the workers: progress lines, not Ray Data's bars, on the console
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        result = make_trainer(cfg, ds, run, name).fit()
    except Exception as err:
        raise TrainingFailed(f"training failed: {err}") from err
    if result.checkpoint is None:
        raise TrainingFailed("training finished without a checkpoint; nothing to export.")
    return result


def export(cfg: TrainConfig, result: Result, ds: Dataset, model_dir: Path) -> Path:
    """The final checkpoint as a one-process model directory with the dataset's tokenizer."""
    with result.checkpoint.as_directory() as ckpt_dir:
        model = load_full_model(cfg.model, Path(ckpt_dir))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    export_model(model, model_dir, tokenizer_path=ds.tokenizer_path)
    export_transformers(model, ds, hf_dir(model_dir))
    return model_dir


def hf_dir(model_dir: Path) -> Path:
    return model_dir.parent / "hf"


def export_transformers(model: MoETransformer, ds: Dataset, out: Path) -> None:
    """The model as a stock transformers directory (moe/hf.py); a model no stock class represents
    exactly (or an install without the `hf` extra) gets a warning, not a failed run."""
    if out.exists():
        shutil.rmtree(out)
    tok = Tokenizer.from_file(str(ds.tokenizer_path))
    try:
        export_hf(model, out, ds.tokenizer_path, eos_token=tok.id_to_token(int(ds.manifest["eos_id"])),
                  pad_token=tok.id_to_token(int(ds.manifest["pad_id"])))
    except (UnsupportedModelError, ImportError) as err:
        logging.getLogger(__name__).warning("no transformers export: %s", err)


def register(cfg: TrainConfig, run: TrackedRun, final: dict[str, Any], model_dir: Path
             ) -> tuple[int, float, float]:
    """Plots and the registered model version; returns (version, first val loss, last val loss)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=run.tracking_uri)

    def series(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run.run_id, key)]

    val = series("val/loss")
    initial_val, final_val = (min(val)[1], max(val)[1]) if val else (math.nan, math.nan)
    mlflow.log_figure(loss_curves({"train/loss": series("train/loss"), "val/loss": val}), "plots/loss_curves.png")
    if final.get("expert_load"):
        mlflow.log_figure(expert_load_heatmap(final["expert_load"], final["moe_layers"]),
                          "plots/expert_load_heatmap.png")
    if hf_dir(model_dir).is_dir():
        mlflow.log_artifacts(str(hf_dir(model_dir)), "hf")
    version = tracking.register_model_dir(model_dir, cfg.tracking.registered_model, run.run_id)
    return version, initial_val, final_val


def run_training(cfg: TrainConfig, resolved_yaml: str, plan: TrainingPlan) -> TrainingOutcome:
    """connect -> check -> MLflow run -> fit -> export -> register (module docstring)."""
    try:
        runtime = connect(cfg.cluster)
    except ClusterMismatchError as err:
        raise TrainingFailed(str(err)) from err
    try:
        ds = check_dataset(cfg)
        if runtime.dashboard_message():
            print(runtime.dashboard_message(), flush=True)
        with tracked_run(cfg, resolved_yaml, plan, ds) as run:
            name = f"train-{run.run_id or 'local'}"
            result = fit(cfg, ds, run, name)
            runtime.shutdown()  # the rest runs in this process
            model_dir = export(cfg, result, ds, Path(cfg.train.storage_path).resolve() / name / "model")
            final = result.metrics or {}
            version, initial_val, final_val = register(cfg, run, final, model_dir) if run.run_id \
                else (None, math.nan, math.nan)
    finally:
        runtime.shutdown()
    return TrainingOutcome(run_id=run.run_id, tracking_uri=run.tracking_uri, model_dir=model_dir,
                           model_version=version, steps=int(final.get("step", 0)), initial_val_loss=initial_val,
                           final_val_loss=final_val, final_train_loss=float(final.get("train/loss", math.nan)))
