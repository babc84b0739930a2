"""Session fixtures of the pipeline tests: a real preprocessed tiny dataset and a tiny model trained
on it by the real training driver (Ray Train, MLflow in a temporary SQLite store, registered as
version 1), for the tests that need a trained model (evaluation, export)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def dataset_root(ray_cluster, compose, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real preprocessed dataset: 40 stdlib files, tiny vocabulary, through pipelines.preprocess."""
    from pipelines.data.config import to_preprocess_config
    from pipelines.data.pipeline import run_preprocess

    root = tmp_path_factory.mktemp("train-data") / "processed"
    cfg = to_preprocess_config(compose("preprocess", [
        "data=tiny", f"data.output_dir={root}", "tracking.enabled=false", "runtime.progress_bars=false",
        "data.sources=[{kind:stdlib,max_files:40}]"]))
    run_preprocess(cfg)
    return root


@dataclass
class TrainedTiny:
    dataset_root: Path
    tracking_uri: str  # sqlite:///... of the run
    run_id: str
    model_dir: Path  # the exported model directory (ours)
    hf_dir: Path  # the transformers directory the driver wrote beside it
    registered_model: str


@pytest.fixture(scope="session")
def trained_tiny(ray_cluster, compose, dataset_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedTiny:
    from pipelines.train.config import to_train_config
    from pipelines.train.driver import run_training
    from pipelines.train.plan import make_plan

    tmp = tmp_path_factory.mktemp("trained-tiny")
    cfg = to_train_config(compose("train", [
        "model=tiny", "data=tiny", f"data.output_dir={dataset_root}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"train.storage_path={tmp / 'runs'}", "train.micro_batch_size=8", "train.log_every=8", "train.eval_batches=2",
        "train.steps=16", "train.eval_every=8", "train.checkpoint_every=16", "optim.lr=0.005", "optim.warmup_steps=4",
        "tracking.registered_model=tiny-eval"]))
    outcome = run_training(cfg, "resolved: test\n", make_plan(cfg))
    assert outcome.model_version == 1 and outcome.run_id
    return TrainedTiny(dataset_root, outcome.tracking_uri, outcome.run_id, outcome.model_dir,
                       outcome.model_dir.parent / "hf", "tiny-eval")
