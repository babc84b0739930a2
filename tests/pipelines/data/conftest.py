"""Fixtures for the data pipeline tests: a real (small) preprocessed dataset built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.data.config import PreprocessConfig, to_preprocess_config


@pytest.fixture(scope="session")
def preprocess_cfg(compose: Callable[..., object]) -> Callable[..., PreprocessConfig]:
    """preprocess_cfg(output_dir, *overrides) -> validated PreprocessConfig from conf/preprocess.yaml."""

    def make(output_dir: Path, *overrides: str) -> PreprocessConfig:
        cfg = compose("preprocess", ["data=tiny", f"data.output_dir={output_dir}", "tracking.enabled=false",
                                     "runtime.progress_bars=false", *overrides])
        return to_preprocess_config(cfg)

    return make


@pytest.fixture(scope="session")
def tiny_cfg(preprocess_cfg, tmp_path_factory) -> PreprocessConfig:
    """40 stdlib files (an explicit cap), tiny vocabulary and sequence length."""
    out = tmp_path_factory.mktemp("tiny") / "processed"
    return preprocess_cfg(out, "data.sources=[{kind:stdlib,max_files:40}]", "runtime.rows_per_shard=1000")


@pytest.fixture(scope="session")
def tiny_dataset(ray_cluster, tiny_cfg) -> Path:
    from pipelines.data.pipeline import run_preprocess

    return run_preprocess(tiny_cfg)
