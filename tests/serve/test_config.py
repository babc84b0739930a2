"""Serve configuration: conf/serve.yaml composes into ServeConfig, impossible values fail with the
key and the fix, build_app turns the config into deployment options, and importing serve.app is
light (no torch, no MLflow) while `serve.app:app` builds on access."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moe.config import ConfigError
from pipelines.core.tracking import absolute_tracking_uri
from serve.app import build_app
from serve.config import ServeConfig, load_config
from tests.conftest import REPO


def test_default_config_composes():
    cfg = load_config()
    assert isinstance(cfg, ServeConfig)
    assert cfg.tracking.registered_model == "elastic-moe" and cfg.engine.max_batch_size == 32
    assert cfg.deployment.num_replicas is None and cfg.deployment.autoscaling.max_replicas == 2
    assert cfg.ingress.api_key_env == "MOE_API_KEY"


@pytest.mark.parametrize("override, fragment", [
    ("engine.max_batch_size=0", "engine.max_batch_size"),
    ("deployment.max_queued_requests=-5", "deployment.max_queued_requests"),
    ("deployment.autoscaling.min_replicas=3", "min_replicas"),
    ("model.device=cuda", "num_gpus"),
    ("model.dtype=float8", "model.dtype"),
    ("model.alias=prod model.version=3", "model.version or model.alias"),
    ("safety.output.regexes=['(unclosed']", "safety.output.regexes[0]"),
])
def test_impossible_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(override.split(" "))
    assert fragment in str(err.value)


def test_wrong_type_fails_at_composition():
    with pytest.raises(Exception, match="max_batch_size"):
        load_config(["engine.max_batch_size=lots"])


def test_build_app_applies_scaling_backpressure_and_health_options():
    cfg = load_config(["deployment.autoscaling.max_replicas=3", "deployment.autoscaling.target_ongoing_requests=8",
                       "deployment.max_ongoing_requests=40", "deployment.max_queued_requests=7",
                       "deployment.health_check_period_s=4", "deployment.num_cpus=2",
                       "tracking.uri=sqlite:///rel/mlflow.db"])
    ingress = build_app(cfg)._bound_deployment
    assert ingress.name == "OpenAIIngress" and ingress._deployment_config.max_ongoing_requests == 1024
    model = ingress.init_args[0]._bound_deployment
    dc = model._deployment_config
    assert model.name == "MoEModel"
    assert (dc.autoscaling_config.min_replicas, dc.autoscaling_config.max_replicas) == (1, 3)
    assert dc.autoscaling_config.target_ongoing_requests == 8
    assert (dc.max_ongoing_requests, dc.max_queued_requests, dc.health_check_period_s) == (40, 7, 4)
    assert model.ray_actor_options["num_cpus"] == 2
    assert cfg.tracking.uri == f"sqlite:///{os.path.abspath('rel/mlflow.db')}"
    fixed = build_app(load_config(["deployment.num_replicas=2"]))._bound_deployment.init_args[0]._bound_deployment
    assert fixed._deployment_config.autoscaling_config is None and fixed.num_replicas == 2


def test_app_builder_takes_overrides():
    from serve.app import build

    model = build({"overrides": ["engine.max_batch_size=4", "deployment.num_replicas=1"]})
    dep = model._bound_deployment.init_args[0]._bound_deployment
    assert dep.init_args[0].engine.max_batch_size == 4 and dep.num_replicas == 1


def test_absolute_tracking_uri():
    assert absolute_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert absolute_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_import_is_light_and_app_builds_on_access():
    code = ("import sys, serve.app; assert 'torch' not in sys.modules and 'mlflow' not in sys.modules; "
            "app = serve.app.app; assert 'torch' not in sys.modules and 'mlflow' not in sys.modules; "
            "d = app._bound_deployment.init_args[0]._bound_deployment; print(d._deployment_config.max_queued_requests)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOE_SERVE_OVERRIDES": "deployment.max_queued_requests=11"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "11"


def test_model_source_resolves_version_alias_latest_run_and_path(tiny_models):
    import filecmp

    from mlflow import MlflowClient

    from serve.deployments import resolve_model_dir, served_model_name

    MlflowClient(tracking_uri=tiny_models.tracking_uri).set_registered_model_alias("tiny-moe", "champion", "1")
    base = [f"tracking.uri={tiny_models.tracking_uri}", "model.registered_name=tiny-moe"]

    def weights_of(overrides: list[str]) -> int:
        d = resolve_model_dir(load_config(overrides))
        return next(v for v, src in tiny_models.dirs.items()
                    if filecmp.cmp(d / "model.safetensors", src / "model.safetensors", shallow=False))

    assert weights_of(base) == 2  # latest
    assert weights_of(base + ["model.version=1"]) == 1
    assert weights_of(base + ["model.alias=champion"]) == 1
    assert weights_of([f"tracking.uri={tiny_models.tracking_uri}", f"model.run_id={tiny_models.run_ids[2]}"]) == 2
    assert weights_of([f"model.path={tiny_models.dirs[1]}"]) == 1
    assert served_model_name(load_config(base)) == "tiny-moe"
    assert served_model_name(load_config([f"model.path={tiny_models.dirs[1]}"])) == tiny_models.dirs[1].name
