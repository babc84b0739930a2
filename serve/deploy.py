"""`python -m serve.deploy [overrides]`: compose conf/serve.yaml, start or connect to Ray, start
Serve's HTTP proxy on `http.host:http.port` and deploy the app (serve/app.py).

With a Ray it started itself it stays in the foreground (Ctrl-C shuts Serve down); connected to a
running cluster with `blocking=false` it returns once the app is running.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from serve.config import ServeConfig, register_configs, to_serve_config

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def connect_ray(address: str | None) -> bool:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray; True if this process started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return False
    ray.init(runtime_env=runtime_env)
    return True


def deploy(cfg: ServeConfig) -> str:
    """Deploy the app; returns its base URL."""
    from ray import serve

    from serve.app import build_app

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    base = f"http://{cfg.http.host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
    log.info("serving %s: %s/v1/models, %s/v1/completions, %s/v1/chat/completions", cfg.app_name, base, base, base)
    return base


register_configs()


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_serve_config(dcfg)
    started = connect_ray(cfg.ray_address)
    base = deploy(cfg)
    print(f"OpenAI-compatible API at {base}/v1 (Ctrl-C to stop)" if cfg.blocking or started
          else f"OpenAI-compatible API at {base}/v1")
    if cfg.blocking or started:
        from ray import serve

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()


if __name__ == "__main__":
    main()
