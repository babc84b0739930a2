"""`python -m serve.deploy [overrides]`: compose conf/serve.yaml, start or connect to Ray (the
project's one way, `cluster.runtime.start_or_connect`), start Serve's HTTP proxy on
`http.host:http.port` and deploy the app (serve/app.py).

With a Ray it started itself it stays in the foreground (Ctrl-C shuts Serve down); connected to a
running cluster with `blocking=false` it returns once the app is running.
"""

from __future__ import annotations

import logging
import time

import hydra
from omegaconf import DictConfig

from serve.config import ServeConfig, register_configs, to_serve_config

log = logging.getLogger(__name__)


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
    from cluster.runtime import RayOptions, start_or_connect

    cfg = to_serve_config(dcfg)
    # ray_address null: RAY_ADDRESS, else a local Ray (dashboard on, as a plain ray.init would)
    runtime = start_or_connect(RayOptions(address=cfg.ray_address, env_vars={"OMP_NUM_THREADS": "1"},
                                          dashboard=True))
    started = runtime.started_locally
    if runtime.dashboard_message():
        print(runtime.dashboard_message(), flush=True)
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
            runtime.shutdown()


if __name__ == "__main__":
    main()
