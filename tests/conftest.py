"""Shared fixtures: one local Ray cluster per test session, a Hydra compose helper with CPU overrides."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """One local Ray for the whole session (4 logical CPUs on 2 cores: tests oversubscribe lightly)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def compose() -> Callable[..., object]:
    """compose(name, overrides) -> composed DictConfig, using the project's conf/ and schemas."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipelines.config import register_configs

    register_configs()

    def _compose(name: str = "train", overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name=name, overrides=list(overrides or []))

    return _compose


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides that make training fast on CPU and keep every output under tmp_path."""
    return [
        "model=tiny", "data=tiny", f"data.output_dir={tmp_path / 'processed'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.storage_path={tmp_path / 'ray_results'}",
    ]
