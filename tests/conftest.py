"""Shared fixtures: one local Ray cluster per test session, a Hydra compose helper with CPU overrides."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray processes export metrics every second (default 10 s; the project's local Ray 5 s), so the monitoring
# tests see a short training's values in Prometheus (tests/cluster/test_monitor.py)
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """One local Ray for the whole session (4 logical CPUs on 2 cores: tests oversubscribe lightly),
    started the project's one way. At the end it stops Serve and Ray and makes sure no process of
    that Ray outlives the suite (a Ray Train controller was once seen hanging in its exit)."""
    import psutil
    import ray

    from cluster.runtime import RayOptions, start_or_connect

    runtime = start_or_connect(RayOptions(num_cpus=4, env_vars={"OMP_NUM_THREADS": "1"}))
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray_processes = psutil.Process().children(recursive=True)  # raylet, GCS and every worker they started
    runtime.shutdown()
    _, alive = psutil.wait_procs(ray_processes, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def compose() -> Callable[..., object]:
    """compose(name, overrides) -> composed DictConfig, using the project's conf/ and schemas."""
    from pipelines.core.config import compose_config
    from pipelines.data.config import register_configs as register_data_configs
    from pipelines.evaluation.config import register_configs as register_evaluation_configs
    from pipelines.train.config import register_configs as register_train_configs
    from serve.config import register_configs as register_serve_configs

    register_train_configs()
    register_data_configs()
    register_serve_configs()
    register_evaluation_configs()

    def _compose(name: str = "train", overrides: list[str] | None = None):
        return compose_config(name, overrides)

    return _compose
