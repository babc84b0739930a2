"""`python -m cluster.monitor`: Prometheus (the operating system's package) scraping the running Ray cluster.

Ray exports every process's metrics (its own and the project's `moe_*` ones, prefixed `ray_`) through
the metrics agent on each node, and its dashboard writes the agents' addresses to a Prometheus
service-discovery file in the session directory (`<session>/prom_metrics_service_discovery.json`,
linked from `/tmp/ray/`). This module writes a `prometheus.yml` that reads that file, starts
`prometheus` listening at `monitoring.prometheus_host` (the address a Ray started by this project
tells its dashboard to query, `cluster.config.MonitoringConfig`), writes the project's Grafana
dashboards into the session's Grafana folder (`cluster.dashboards`), prints the URL and stops
Prometheus cleanly on Ctrl-C. A cluster started without the dashboard has no discovery file; then
the same targets are written from `ray.nodes()` once, at start.

Prometheus is not a Python package: `apt-get install prometheus` (Debian/Ubuntu); without it the
command stops with that install command.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import MonitoringConfig, validate_monitoring
from moe.config import ConfigError

DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # Ray's name (ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE)
INSTALL_HINT = ("install it with `sudo apt-get install -y prometheus` (Debian/Ubuntu; other systems: "
                "https://prometheus.io/download/), or point prometheus_bin= at the binary")


class MonitorError(RuntimeError):
    """Prometheus cannot be started (missing binary, port taken, bad configuration)."""


@dataclass
class MonitorConfig:
    """conf/monitor.yaml: which Ray to scrape and how Prometheus runs."""

    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)  # listens at monitoring.prometheus_host
    ray_address: str | None = "auto"  # HOST:PORT; auto: RAY_ADDRESS, else `ray start`'s, else the newest local Ray
    scrape_interval_s: float = 5.0  # how often Prometheus reads every node's metrics
    retention: str = "1d"  # --storage.tsdb.retention.time
    storage_dir: str = "outputs/prometheus"  # prometheus.yml, the targets file (if written) and the TSDB
    prometheus_bin: str = "prometheus"
    dashboards: bool = True  # write the project's Grafana dashboards into the session's Grafana folder
    ready_timeout_s: float = 60.0  # how long to wait for Prometheus to answer


def validate_monitor_config(c: MonitorConfig) -> MonitorConfig:
    validate_monitoring(c.monitoring)
    if not 0.1 <= c.scrape_interval_s <= 300:
        raise ConfigError(f"scrape_interval_s={c.scrape_interval_s} is out of range; use 0.1 to 300 seconds.")
    return c


def find_prometheus(binary: str) -> str:
    """The prometheus executable, or MonitorError naming the install command."""
    path = shutil.which(binary)
    if path is None:
        raise MonitorError(f"the prometheus binary ({binary!r}) was not found on PATH; {INSTALL_HINT}.")
    return path


def listen_address(prometheus_host: str) -> str:
    """`http://127.0.0.1:9095` -> `127.0.0.1:9095` (Prometheus's --web.listen-address)."""
    url = urllib.parse.urlparse(prometheus_host)
    return f"{url.hostname}:{url.port or 80}"


def ray_discovery_file(session_dir: str | None) -> Path | None:
    """Ray's service-discovery file for this session (the dashboard writes it), if there is one."""
    if session_dir and (Path(session_dir) / DISCOVERY_FILE).is_file():
        return Path(session_dir) / DISCOVERY_FILE
    return None


def write_node_targets(path: Path) -> Path:
    """The targets Ray's discovery file would hold (every live node's metrics agent), from ray.nodes()."""
    import ray

    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
    path.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    return path


def prometheus_yml(discovery: Path, scrape_interval_s: float) -> str:
    interval = f"{int(scrape_interval_s * 1000)}ms"
    return (f"global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n"
            f"  evaluation_interval: {interval}\n"
            "scrape_configs:\n- job_name: ray\n  file_sd_configs:\n"
            f"  - files: ['{discovery}']\n    refresh_interval: {interval}\n")


def query(base_url: str, expr: str, timeout: float = 10.0, **params: float) -> list[dict[str, Any]]:
    """An instant PromQL query through the HTTP API (`time=` optional): the result (raises on a bad expression)."""
    return _api(base_url, "query", {"query": expr, **params}, timeout)


def query_range(base_url: str, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
    """A PromQL range query: one series per label set, each with its `values` [[time, "value"], ...]."""
    return _api(base_url, "query_range", {"query": expr, "start": start, "end": end, "step": step}, 30.0)


def _api(base_url: str, endpoint: str, params: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    url = f"{base_url.rstrip('/')}/api/v1/{endpoint}?" + urllib.parse.urlencode(params)
    expr = params["query"]
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as err:
        raise MonitorError(f"PromQL {expr!r} failed: {err.code} {err.read().decode(errors='replace')}") from err
    return body["data"]["result"]


class Prometheus:
    """One prometheus process: `start()` waits until it answers, `stop()` ends it (also as a context manager)."""

    def __init__(self, cfg: MonitorConfig, discovery: Path) -> None:
        self.cfg, self.discovery = cfg, discovery
        self.url = cfg.monitoring.prometheus_host.rstrip("/")
        self.dir = Path(cfg.storage_dir).resolve()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        binary = find_prometheus(self.cfg.prometheus_bin)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "prometheus.yml").write_text(prometheus_yml(self.discovery, self.cfg.scrape_interval_s))
        log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 (kept open for the process's lifetime)
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--storage.tsdb.retention.time={self.cfg.retention}",
             f"--web.listen-address={listen_address(self.url)}"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise MonitorError(f"prometheus exited with code {self.proc.returncode} at start (is "
                                   f"{listen_address(self.url)} already in use? set monitoring.prometheus_host= to "
                                   f"another port):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise MonitorError(f"prometheus did not answer at {self.url} within {self.cfg.ready_timeout_s:g} s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        path = self.dir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def stop(self) -> None:
        """SIGTERM (Prometheus flushes and exits), then SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_monitor(cfg: MonitorConfig, session_dir: str | None) -> Prometheus:
    """Write the dashboards and the scrape config for the connected Ray session; start Prometheus."""
    from cluster.dashboards import provision

    find_prometheus(cfg.prometheus_bin)  # fail before writing anything
    storage = Path(cfg.storage_dir).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    discovery = ray_discovery_file(session_dir) or write_node_targets(storage / "ray_targets.json")
    if cfg.dashboards and session_dir:
        provision(Path(session_dir), cfg.monitoring.prometheus_name)
    return Prometheus(cfg, discovery).start()


def run(cfg: MonitorConfig) -> int:
    """The command line: connect to Ray, start Prometheus, print where to look, stop on Ctrl-C."""
    from cluster.runtime import RayOptions, start_or_connect

    try:
        find_prometheus(cfg.prometheus_bin)
        runtime = start_or_connect(RayOptions(address=cfg.ray_address, log_to_driver=False))
    except (ConnectionError, RuntimeError) as err:
        hint = "" if isinstance(err, MonitorError) else (
            f" (no running Ray cluster at ray_address={cfg.ray_address!r}: start one first, e.g. `make train` or "
            "`python -m serve.deploy`, or set ray_address=HOST:PORT; a cluster on another machine that uses token "
            "authentication also needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)")
        print(f"error: {err}{hint}", file=sys.stderr)
        return 1
    try:
        prom = start_monitor(cfg, runtime.session_dir)
    except MonitorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if not runtime.started_locally:
            disconnect()
    with prom:
        print(f"Prometheus: {prom.url} (scraping Ray session {runtime.session_dir} via {prom.discovery}; "
              f"graph: {prom.url}/graph?g0.expr=ray_moe_train_tokens_per_second)", flush=True)
        print("The Ray dashboard's charts query it when Ray was started with monitoring.prometheus_host="
              f"{cfg.monitoring.prometheus_host}. Ctrl-C stops Prometheus.", flush=True)
        try:
            while prom.proc is not None and prom.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping Prometheus", flush=True)
    return 0 if prom.proc is None or prom.proc.returncode in (0, -15) else 1


def disconnect() -> None:
    """Leave the Ray cluster once Prometheus runs: it reads Ray's discovery file itself, and a connected driver
    is ended by Ray a minute after the cluster stops (the monitor was, leaving prometheus running without it)."""
    import ray

    ray.shutdown()  # a driver connected to a running cluster only disconnects


def register_configs() -> None:
    """Register the monitor schema in Hydra's ConfigStore (conf/monitor.yaml composes against it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="monitor_schema", node=MonitorConfig)


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    register_configs()

    @hydra.main(config_path="../conf", config_name="monitor", version_base="1.3")
    def _main(dcfg: DictConfig) -> None:
        try:
            cfg = validate_monitor_config(OmegaConf.to_object(dcfg))  # type: ignore[arg-type]
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        sys.exit(run(cfg))

    _main()


if __name__ == "__main__":
    main()
