"""One training run, driver side, in this order:

    connect   start a local Ray or connect to the profile's cluster (cluster.runtime), check resources
    check     the dataset exists and matches the config (seq_len, vocabulary, enough sequences)
    track     an MLflow run as a context: params, config, manifest, tokenizer; ended FAILED on any
              exception below, export and registration included. `train.resume=latest|<run id>`
              reopens that run instead and continues from its checkpoints (`resume_target`)
    fit       a Ray Train TorchTrainer running `pipelines.train.worker.Trainer` on every worker,
              elastic between cluster.min_workers and cluster.num_workers (checked for resizes every
              cluster.resize_check_interval_s); checkpoints go to `<storage>/train-<run id>/checkpoints`
    export    the latest good checkpoint as a one-process model directory (moe.checkpoint), and beside
              it the stock transformers directory (moe.hf) when a stock class represents the model
    register  plots, the model logged under the run and registered as a new version, the
              transformers directory logged as artifact `hf`
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from ray.train import FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tokenizers import Tokenizer

from cluster.profiles import worker_resources
from cluster.runtime import ClusterMismatchError, connect
from moe.checkpoint import CheckpointStore, checkpoint_step, export_model, load_full_model, read_extra
from moe.hf import UnsupportedModelError, export_hf
from moe.model import MoETransformer
from pipelines.core import tracking
from pipelines.data.ingest import read_manifest, resolve_dataset_dir
from pipelines.train.config import TrainConfig, global_batch_size
from pipelines.train.plan import TrainingPlan
from pipelines.train.progress import TrainProgress, sync_metrics
from pipelines.train.report import expert_load_heatmap, loss_curves
from pipelines.train.worker import LEDGER_FILE, train_loop_per_worker

WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by the Ray Train controller


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
    """The MLflow run of a training (ids are None when tracking is off) and where its checkpoints go."""

    run_id: str | None
    tracking_uri: str | None
    checkpoint_dir: Path
    resume_cause: str | None = None  # set when this process continues an earlier run (train.resume)


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
    check_batch_fits(cfg, ds)
    return ds


def check_batch_fits(cfg: TrainConfig, ds: Dataset) -> None:
    """TrainingFailed when the train split holds fewer sequences than one global batch."""
    if ds.sequences("train") < global_batch_size(cfg):
        raise TrainingFailed(
            f"dataset {ds.path} has {ds.sequences('train')} training sequences, fewer than one "
            f"global batch ({global_batch_size(cfg)}); add data or lower train.global_batch_size "
            "(or train.micro_batch_size)."
        )


def run_dir(cfg: TrainConfig, run_id: str | None) -> Path:
    """`<train.storage_path>/train-<run id>`: Ray Train's run directory, our checkpoints inside it."""
    name = f"train-{run_id}" if run_id else f"train-local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return Path(cfg.train.storage_path).resolve() / name


def resume_target(cfg: TrainConfig) -> str | None:
    """The MLflow run id `train.resume` names (`latest`: the newest run of the experiment with a
    checkpoint); TrainingFailed with the fix when there is none."""
    if cfg.train.resume is None:
        return None
    if not cfg.tracking.enabled:
        raise TrainingFailed("train.resume needs the MLflow record of the run: set tracking.enabled=true.")
    from mlflow import MlflowClient

    uri = tracking.configure(cfg.tracking)
    client = MlflowClient(tracking_uri=uri)
    if cfg.train.resume != "latest":
        try:
            runs = [client.get_run(cfg.train.resume)]
        except Exception as err:
            raise TrainingFailed(f"train.resume={cfg.train.resume}: no such MLflow run in {uri} ({err}); "
                                 "use a run id from `mlflow ui` or train.resume=latest.") from err
    else:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=100)
    for run in runs:
        store = CheckpointStore(run_dir(cfg, run.info.run_id) / "checkpoints")
        if store.committed():
            return run.info.run_id
    raise TrainingFailed(f"train.resume={cfg.train.resume}: no run with a checkpoint under "
                         f"{Path(cfg.train.storage_path).resolve()} (train.storage_path) in {uri}; start a new run "
                         "without train.resume.")


@contextmanager
def tracked_run(cfg: TrainConfig, resolved_yaml: str, plan: TrainingPlan, ds: Dataset,
                resume_run_id: str | None = None) -> Iterator[TrackedRun]:
    """An MLflow run with the run's params and inputs (or the reopened run `resume_run_id`);
    FINISHED on success, FAILED on any exception."""
    if not cfg.tracking.enabled:
        yield TrackedRun(None, None, run_dir(cfg, None) / "checkpoints")
        return
    import mlflow

    uri = tracking.configure(cfg.tracking)
    if resume_run_id:
        with mlflow.start_run(run_id=resume_run_id) as run:
            mlflow.set_tag("resumed_by", f"train.resume={cfg.train.resume} at {time.strftime('%Y-%m-%dT%H:%M:%S')}")
            yield TrackedRun(run.info.run_id, uri, run_dir(cfg, run.info.run_id) / "checkpoints",
                             resume_cause=f"resume: train.resume={cfg.train.resume}")
        return
    with mlflow.start_run(run_name=cfg.tracking.run_name) as run:  # ends FAILED if the body raises
        tracking.log_params(tracking.flatten(cfg))
        mlflow.log_params({"plan.global_batch": plan.global_batch, "plan.total_params": plan.total_params,
                           "plan.active_params": plan.active_params, "data.dataset_dir": str(ds.path)})
        mlflow.log_text(resolved_yaml, "config/train.yaml")
        mlflow.log_dict(ds.manifest, "data/manifest.json")
        mlflow.log_artifact(str(ds.tokenizer_path), "tokenizer")
        mlflow.set_tags({"cluster": cfg.cluster.name, "model": cfg.model.name,
                         "dataset_version": ds.manifest["version"],
                         "checkpoint_dir": str(run_dir(cfg, run.info.run_id) / "checkpoints")})
        yield TrackedRun(run.info.run_id, uri, run_dir(cfg, run.info.run_id) / "checkpoints")


def make_trainer(cfg: TrainConfig, ds: Dataset, run: TrackedRun, loop: Callable[[dict[str, Any]], None]
                 = train_loop_per_worker, extra_config: dict[str, Any] | None = None) -> TorchTrainer:
    """The Ray Train TorchTrainer: elastic scaling from the profile, failures, our checkpoint directory.
    `loop` runs on every worker with the config dict (fine-tuning passes its own, and `extra_config`)."""
    cl = cfg.cluster
    n_workers: int | tuple[int, int] = cl.num_workers if cl.min_workers is None else (cl.min_workers, cl.num_workers)
    os.environ[WORKER_START_TIMEOUT_ENV] = str(cl.worker_start_timeout_s)  # propagated to the controller
    name = run.checkpoint_dir.parent.name + (f"-resume-{int(time.time())}" if run.resume_cause else "")
    return TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg, "dataset_dir": str(ds.path), "checkpoint_dir": str(run.checkpoint_dir),
                           "n_val_sequences": ds.sequences("val"), **(extra_config or {})},
        torch_config=TorchConfig(backend=cl.backend),
        scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=cl.gpus_per_worker > 0,
                                     resources_per_worker=worker_resources(cl),
                                     elastic_resize_monitor_interval_s=cl.resize_check_interval_s),
        run_config=RunConfig(
            name=name, storage_path=str(Path(cfg.train.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[TrainProgress(run.tracking_uri, run.run_id, cfg.train.steps, run.checkpoint_dir,
                                     run.resume_cause)],
        ),
    )


def fit(cfg: TrainConfig, ds: Dataset, run: TrackedRun, loop: Callable[[dict[str, Any]], None]
        = train_loop_per_worker, extra_config: dict[str, Any] | None = None) -> tuple[Result, Path]:
    """Train (`make_trainer`); returns Ray's result and the latest good checkpoint (TrainingFailed if none)."""
    try:
        result = make_trainer(cfg, ds, run, loop, extra_config).fit()
    except Exception as err:
        raise TrainingFailed(f"training failed: {err} (continue it with train.resume="
                             f"{run.run_id or 'latest'} once the cause is fixed)") from err
    checkpoint, skipped = CheckpointStore(run.checkpoint_dir).latest_valid()
    for problem in skipped:
        logging.getLogger(__name__).warning("damaged checkpoint skipped: %s", problem)
    if checkpoint is None:
        raise TrainingFailed(f"training finished without a checkpoint in {run.checkpoint_dir}; nothing to export.")
    return result, checkpoint


def export(cfg: TrainConfig, checkpoint: Path, ds: Dataset, model_dir: Path) -> Path:
    """A checkpoint as a one-process model directory with the dataset's tokenizer."""
    model = load_full_model(cfg.model, checkpoint)
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


def register(cfg: TrainConfig, run: TrackedRun, final: dict[str, Any], model_dir: Path, checkpoint: Path
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
    if final.get("expert_load"):  # the trainer state of the final checkpoint
        mlflow.log_figure(expert_load_heatmap(final["expert_load"], final["moe_layers"]),
                          "plots/expert_load_heatmap.png")
    if hf_dir(model_dir).is_dir():
        mlflow.log_artifacts(str(hf_dir(model_dir)), "hf")
    mlflow.log_artifact(str(checkpoint / LEDGER_FILE), "data")  # which sequences each step trained on
    version = tracking.register_model_dir(model_dir, cfg.tracking.registered_model, run.run_id)
    return version, initial_val, final_val


def last_metric(run: TrackedRun, key: str) -> float:
    """The last logged value of `key` in the run's MLflow record (nan without tracking)."""
    if not run.run_id:
        return math.nan
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=run.tracking_uri).get_metric_history(run.run_id, key)
    return max(history, key=lambda m: m.step).value if history else math.nan


def run_training(cfg: TrainConfig, resolved_yaml: str, plan: TrainingPlan) -> TrainingOutcome:
    """connect -> check -> MLflow run -> fit -> export -> register (module docstring)."""
    resume_run_id = resume_target(cfg)
    try:
        runtime = connect(cfg.cluster)
    except ClusterMismatchError as err:
        raise TrainingFailed(str(err)) from err
    try:
        ds = check_dataset(cfg)
        if runtime.dashboard_message():
            print(runtime.dashboard_message(), flush=True)
        with tracked_run(cfg, resolved_yaml, plan, ds, resume_run_id) as run:
            result, checkpoint = fit(cfg, ds, run)
            runtime.shutdown()  # the rest runs in this process
            model_dir = export(cfg, checkpoint, ds, run.checkpoint_dir.parent / "model")
            final = read_extra(checkpoint)["trainer"]
            if run.run_id:  # the rows the last reports may not have delivered
                sync_metrics(MlflowClient(tracking_uri=run.tracking_uri), run.run_id, checkpoint)
            version, initial_val, final_val = register(cfg, run, final, model_dir, checkpoint) if run.run_id \
                else (None, math.nan, math.nan)
    finally:
        runtime.shutdown()
    return TrainingOutcome(run_id=run.run_id, tracking_uri=run.tracking_uri, model_dir=model_dir,
                           model_version=version, steps=checkpoint_step(checkpoint), initial_val_loss=initial_val,
                           final_val_loss=final_val, final_train_loss=float((result.metrics or {}).get(
                               "train/loss", last_metric(run, "train/loss"))))
