"""The Serve application: `build_app(cfg)` binds the model deployment (its resource profile,
autoscaling, backpressure, health checks) and the OpenAI ingress that holds its handle.

- `serve run serve.app:app` / RayService `import_path: serve.app:app`: conf/serve.yaml, plus
  Hydra overrides from the environment variable MOE_SERVE_OVERRIDES (space-separated).
- `import_path: serve.app:build` with `args: {overrides: ["model.version=3", ...]}`: an app builder.
`app` is built on first access (module `__getattr__`), so importing this module does no work.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from ray.serve import Application

from pipelines.core.tracking import absolute_tracking_uri
from serve.config import ServeConfig, load_config

OVERRIDES_ENV = "MOE_SERVE_OVERRIDES"


def build_app(cfg: ServeConfig) -> Application:
    from serve.api import OpenAIIngress
    from serve.deployments import MoEModelServer

    cfg.tracking.uri = absolute_tracking_uri(cfg.tracking.uri)
    if cfg.model.path:
        cfg.model.path = os.path.abspath(cfg.model.path)
    if cfg.ingress.api_keys_file:  # the ingress replica reads it
        cfg.ingress.api_keys_file = os.path.abspath(cfg.ingress.api_keys_file)
    d = cfg.deployment
    scaling: dict[str, Any]
    if d.num_replicas is not None:
        scaling = {"num_replicas": d.num_replicas}
    else:
        a = d.autoscaling
        scaling = {"autoscaling_config": {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas, "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s, "metrics_interval_s": a.metrics_interval_s}}
    model = MoEModelServer.options(
        **scaling, max_ongoing_requests=d.max_ongoing_requests, max_queued_requests=d.max_queued_requests,
        health_check_period_s=d.health_check_period_s, health_check_timeout_s=d.health_check_timeout_s,
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
    ).bind(cfg)
    ing = cfg.ingress
    actor_options: dict[str, Any] = {"num_cpus": ing.num_cpus}
    key = os.environ.get(ing.api_key_env)
    if key:  # the deploying process's key reaches the ingress replicas
        actor_options["runtime_env"] = {"env_vars": {ing.api_key_env: key}}
    return OpenAIIngress.options(
        num_replicas=ing.num_replicas, max_ongoing_requests=ing.max_ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(model, ing)


def build(args: dict[str, Any]) -> Application:
    """Serve app builder: `args: {overrides: [...]}` (Hydra override strings)."""
    overrides = list(args.get("overrides", []))
    return build_app(load_config(overrides))


def __getattr__(name: str) -> Application:
    if name == "app":
        return build_app(load_config(shlex.split(os.environ.get(OVERRIDES_ENV, ""))))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
