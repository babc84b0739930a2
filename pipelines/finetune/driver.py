"""One fine-tuning run, driver side, in this order:

    base      resolve the base model (registry, run, directory, or a transformers directory imported
              with moe.hf) to a local exported directory; the run's model config is the base's
    data      the preprocessed shards (same tokenizer as the base, checked) or the user's files
              tokenized with the base's tokenizer (pipelines/finetune/data.py)
    privacy   with privacy on: the sample rate and the noise multiplier for target_epsilon over
              train.steps (refused before Ray starts when the target cannot be met)
    track     an MLflow run (params, base model, trainable fraction), ended FAILED on any exception;
              the run directory is the training's (`<train.storage_path>/train-<run id>`)
    fit       the training driver's `fit` running `FinetuneTrainer` (the training's elastic scaling,
              layout, data order and `CheckpointStore` under `<run dir>/checkpoints`)
    export    adapters from the newest valid checkpoint: peft's format for the transformers export
              (`<run dir>/adapter`), and the merged model (`model/`, and `hf/` when a stock class fits)
    register  the metric rows of the final checkpoint synced to MLflow, the merged model as a new
              version of tracking.registered_model, tagged with the base
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from cluster.runtime import ClusterMismatchError, connect
from moe.checkpoint import (
    checkpoint_step,
    export_model,
    load_adapter_weights,
    load_model,
    model_config_from_dict,
)
from moe.files import CONFIG_FILE, TOKENIZER_FILE
from moe.hf import UnsupportedModelError, export_peft_adapter, load_hf
from moe.lora import adapters_of, apply_lora, remove_lora, trainable_fraction_line
from moe.model import build_meta_model
from pipelines.core import tracking
from pipelines.core.model_source import ModelNotFound, ResolvedModel, resolve_model
from pipelines.data.ingest import read_manifest
from pipelines.finetune.config import FinetuneConfig, with_base_model
from pipelines.finetune.data import DataError, build_files_dataset
from pipelines.finetune.privacy import PrivacyBudgetError, plan_noise
from pipelines.finetune.worker import finetune_loop_per_worker
from pipelines.train.driver import (
    Dataset,
    TrackedRun,
    TrainingFailed,
    check_batch_fits,
    check_dataset,
    export_transformers,
    fit,
    hf_dir,
    run_dir,
)
from pipelines.train.progress import METRICS_FILE, sync_metrics


@dataclass
class FinetuneOutcome:
    run_id: str | None
    tracking_uri: str | None
    base: str
    model_dir: Path  # the merged model (ours)
    adapter_dir: Path | None  # peft's format (None when no stock transformers class fits)
    model_version: int | None
    steps: int
    final_train_loss: float
    final_val_loss: float
    trainable_fraction: float
    epsilon: float | None

    def summary_lines(self) -> list[str]:
        lines = [f"fine-tuned {self.base} for {self.steps} steps: train loss {self.final_train_loss:.4f}, "
                 f"val loss {self.final_val_loss:.4f}, {100 * self.trainable_fraction:.3f}% of the parameters trained",
                 f"merged model in {self.model_dir}" + (f", peft adapter in {self.adapter_dir}" if self.adapter_dir
                                                        else "")]
        if self.epsilon is not None:
            lines.append(f"differential privacy: epsilon {self.epsilon:.3f}")
        if self.run_id:
            lines.append(f"MLflow run {self.run_id} in {self.tracking_uri}; registered version {self.model_version}")
        return lines


def resolve_base(cfg: FinetuneConfig, work: Path) -> ResolvedModel:
    """The base model as a local exported directory (a transformers directory is imported first)."""
    if cfg.base.hf_path:
        src = Path(cfg.base.hf_path).expanduser()
        if not (src / TOKENIZER_FILE).is_file():
            raise TrainingFailed(f"base.hf_path={src} has no {TOKENIZER_FILE}; fine-tuning needs the base's tokenizer.")
        out = work / "base"
        export_model(load_hf(src), out, tokenizer_path=src / TOKENIZER_FILE)
        return ResolvedModel(out, f"transformers {src.name}")
    try:
        return resolve_model(cfg.base, cfg.tracking, dst=work / "base")
    except ModelNotFound as err:
        raise TrainingFailed(str(err)) from err


def finetune_dataset(cfg: FinetuneConfig, base: ResolvedModel, work: Path) -> Dataset:
    """The user's files tokenized with the base's tokenizer, or the preprocessed shards (same tokenizer)."""
    if cfg.files.paths:
        try:
            path = build_files_dataset(cfg.files, base.tokenizer_path, cfg.data.seq_len, work / "data", cfg.train.seed)
        except DataError as err:
            raise TrainingFailed(str(err)) from err
        ds = Dataset(path, read_manifest(path))
        check_batch_fits(cfg, ds)  # the training's data order steps by global batches, with privacy too
        return ds
    ds = check_dataset(cfg)
    if json.loads(ds.tokenizer_path.read_text()) != json.loads(base.tokenizer_path.read_text()):
        raise TrainingFailed(f"the dataset {ds.path} was tokenized with another tokenizer than the base model "
                             f"{base.label}; preprocess with the base's data, or give files.paths (tokenized with the "
                             "base's tokenizer).")
    return ds


def plan_privacy(cfg: FinetuneConfig, ds: Dataset) -> float | None:
    """With privacy on: set the noise multiplier (and log every step); returns the planned epsilon."""
    if not cfg.privacy.enabled:
        return None
    try:
        q, sigma, eps = plan_noise(cfg.privacy, ds.sequences("train"), cfg.train.steps)
    except PrivacyBudgetError as err:
        raise TrainingFailed(str(err)) from err
    cfg.privacy.noise_multiplier = sigma
    cfg.train.log_every = 1  # epsilon is logged after every step
    print(f"[finetune] DP-SGD: sample rate {q:.4g}, noise multiplier {sigma:.4g}, clip {cfg.privacy.max_grad_norm}, "
          f"epsilon {eps:.3f} after {cfg.train.steps} steps (target {cfg.privacy.target_epsilon}, "
          f"delta {cfg.privacy.delta}, {cfg.privacy.accountant})", flush=True)
    return eps


@contextmanager
def tracked_run(cfg: FinetuneConfig, resolved_yaml: str, base: ResolvedModel, ds: Dataset, fraction: float
                ) -> Iterator[TrackedRun]:
    """An MLflow run with the config, the base model and the trainable fraction; FAILED on any exception."""
    if not cfg.tracking.enabled:
        yield TrackedRun(None, None, run_dir(cfg, None) / "checkpoints")
        return
    import mlflow

    uri = tracking.configure(cfg.tracking)
    with mlflow.start_run(run_name=cfg.tracking.run_name) as run:
        tracking.log_params(tracking.flatten(cfg))
        mlflow.log_params({"lora.trainable_fraction": fraction, "data.dataset_dir": str(ds.path)})
        mlflow.log_metric("lora/trainable_fraction", fraction)
        mlflow.log_text(resolved_yaml, "config/finetune.yaml")
        mlflow.set_tags({"task": "finetune", "base_model": base.label, "base_registered_name": base.registered_name
                         or "", "base_version": base.version or "", "base_run_id": base.run_id or "",
                         "privacy": str(cfg.privacy.enabled).lower(),
                         "checkpoint_dir": str(run_dir(cfg, run.info.run_id) / "checkpoints")})
        yield TrackedRun(run.info.run_id, uri, run_dir(cfg, run.info.run_id) / "checkpoints")


def export(cfg: FinetuneConfig, checkpoint: Path, base: ResolvedModel, ds: Dataset, out: Path) -> Path | None:
    """The adapters of `checkpoint` as `out/adapter` (peft's format), `out/model` (merged, ours) and
    `out/hf`; returns the adapter dir or None."""
    model = load_model(base.path)
    apply_lora(model, cfg.lora, seed=cfg.train.seed)
    load_adapter_weights(model, checkpoint)
    adapter_dir: Path | None = out / "adapter"
    try:
        export_peft_adapter(model, adapters_of(model), cfg.lora.rank, cfg.lora.alpha, adapter_dir)
    except UnsupportedModelError as err:
        logging.getLogger(__name__).warning("no peft adapter: %s", err)
        adapter_dir = None
    remove_lora(model, merge=True)
    model.cfg = cfg.model  # the fine-tuning's balance settings travel with the merged model
    export_model(model, out / "model", tokenizer_path=ds.tokenizer_path)
    export_transformers(model, ds, hf_dir(out / "model"))
    return adapter_dir


def register(cfg: FinetuneConfig, run_id: str, base: ResolvedModel, out: Path, adapter_dir: Path | None) -> int:
    import mlflow
    from mlflow import MlflowClient

    for sub in ("hf", "adapter"):
        if (out / sub).is_dir():
            mlflow.log_artifacts(str(out / sub), sub)
    version = tracking.register_model_dir(out / "model", cfg.tracking.registered_model, run_id)
    client = MlflowClient()
    tags = {"task": "finetune", "base_model": base.label, "base_registered_name": base.registered_name or "",
            "base_version": base.version or "", "base_run_id": base.run_id or "",
            "adapter_artifact": "adapter" if adapter_dir else ""}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.tracking.registered_model, str(version), key, value)
    return version


def prepare(cfg: FinetuneConfig, work: Path) -> tuple[ResolvedModel, Dataset, float, str]:
    """Base, model config, data, privacy plan and the trainable fraction, before any worker starts."""
    base = resolve_base(cfg, work)
    with_base_model(cfg, model_config_from_dict(json.loads((base.path / CONFIG_FILE).read_text())))
    ds = finetune_dataset(cfg, base, work)
    plan_privacy(cfg, ds)
    fraction, line = trainable_fraction_line(build_meta_model(cfg.model), cfg.lora)
    return base, ds, fraction, line


def run_finetune(cfg: FinetuneConfig, resolved_yaml: str, work: Path) -> FinetuneOutcome:
    """connect -> base -> data -> privacy -> MLflow run -> fit -> export -> register (module docstring)."""
    try:
        runtime = connect(cfg.cluster)
    except ClusterMismatchError as err:
        raise TrainingFailed(str(err)) from err
    try:
        base, ds, fraction, line = prepare(cfg, work)
        print(f"[finetune] base {base.label}; {line}", flush=True)
        with tracked_run(cfg, resolved_yaml, base, ds, fraction) as run:
            _, checkpoint = fit(cfg, ds, run, finetune_loop_per_worker, {"base_dir": str(base.path)})
            runtime.shutdown()  # the rest runs in this process
            out = run.checkpoint_dir.parent
            adapter_dir = export(cfg, checkpoint, base, ds, out)
            version = None
            if run.run_id:  # the rows the last reports may not have delivered, then the new version
                sync_metrics(MlflowClient(tracking_uri=run.tracking_uri), run.run_id, checkpoint)
                version = register(cfg, run.run_id, base, out, adapter_dir)
    finally:
        runtime.shutdown()
    m = json.loads((checkpoint / METRICS_FILE).read_text())[-1]  # the final step's row of the trajectory
    return FinetuneOutcome(run.run_id, run.tracking_uri, base.label, out / "model", adapter_dir, version,
                           checkpoint_step(checkpoint), float(m.get("train/loss", math.nan)),
                           float(m.get("val/loss", math.nan)), fraction, m.get("privacy/epsilon"))
