"""Monitoring against a real Prometheus (the OS package) scraping the session's real Ray: a short
preprocessing run (with bad input), a short training and a short serving load, then PromQL through
Prometheus's HTTP API: the project's series exist with plausible values, training loss falls, and
every expression of the shipped Grafana dashboards returns data. Also `python -m cluster.monitor`
end to end (starts, prints its URL, stops on Ctrl-C) and the error without a prometheus binary."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cluster import dashboards
from cluster.config import MonitoringConfig
from cluster.monitor import (
    MonitorConfig,
    MonitorError,
    find_prometheus,
    query,
    query_range,
    run,
    start_monitor,
    validate_monitor_config,
)
from tests.conftest import REPO
from tests.serve.conftest import free_port


def require_prometheus() -> None:
    try:
        find_prometheus("prometheus")
    except MonitorError as err:  # never skipped: CI installs it (.ci/run)
        pytest.fail(f"{err} (the monitoring tests need it; .ci/run installs it)")


@dataclass
class Observed:
    url: str  # Prometheus
    start: float  # when it started scraping
    session_dir: str
    root: Path  # this module's files (data, MLflow, runs)

    def window(self) -> tuple[float, float]:
        return self.start, time.time()


def preprocess_with_bad_input(compose, root: Path) -> dict:
    from pipelines.data.config import to_preprocess_config
    from pipelines.data.pipeline import preprocess

    docs = root / "docs.jsonl"
    docs.write_text(json.dumps({"text": "def greet(name):\n    return 'hello ' + name\n" * 4}) + "\n"
                    + '{"text": "a broken line\n' + json.dumps({"body": "no text field"}) + "\n")
    cfg = to_preprocess_config(compose("preprocess", [
        "data=tiny", f"data.output_dir={root / 'processed'}", "tracking.enabled=false", "runtime.progress_bars=false",
        f"data.sources=[{{kind:stdlib,max_files:40}},{{kind:jsonl,path:'{docs}',field:text}},"
        f"{{kind:text,path:'{root / 'missing'}/*.txt'}}]"]))
    out, reused = preprocess(cfg)
    assert not reused
    return json.loads((out / "manifest.json").read_text())


def train_tiny(compose, root: Path):
    from pipelines.train.config import to_train_config
    from pipelines.train.driver import run_training
    from pipelines.train.plan import make_plan

    cfg = to_train_config(compose("train", [
        "model=tiny", "data=tiny", f"data.output_dir={root / 'processed'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"train.storage_path={root / 'runs'}", "train.micro_batch_size=8", "train.log_every=2", "train.eval_batches=2",
        "train.steps=24", "train.eval_every=24", "train.checkpoint_every=24", "optim.lr=0.005", "optim.warmup_steps=4",
        "tracking.registered_model=tiny-monitor"]))
    outcome = run_training(cfg, "resolved: test\n", make_plan(cfg))
    assert outcome.model_version == 1
    return outcome


def serve_load(tracking_uri: str, prometheus_url: str) -> int:
    """Deploy the trained model from the registry, send 12 completions and 2 malformed requests, then one
    completion a second until Prometheus has two scrapes of every serving series in each dashboard
    expression's rate window (a quiet machine answers the first 12 within one scrape); tokens served."""
    from ray import serve

    from serve.app import build_app
    from serve.config import load_config

    port = free_port()
    cfg = load_config([f"tracking.uri={tracking_uri}", "model.registered_name=tiny-monitor", "deployment.num_cpus=0.5",
                       "ingress.num_cpus=0.05", "engine.log_interval_s=1", "engine.max_batch_size=4",
                       "deployment.autoscaling.min_replicas=1", "deployment.autoscaling.max_replicas=1",
                       "model.num_threads=1", "ingress.api_key_env=MOE_TEST_MONITOR_KEY_UNSET"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="moe", route_prefix="/", blocking=False)
    tokens = 0
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for i in range(12):
            r = client.post("/v1/completions", json={"model": "tiny-monitor", "prompt": f"def f{i}(x):",
                                                     "max_tokens": 8, "temperature": 0.0})
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["completion_tokens"]
        for bad in ({"model": "tiny-monitor", "prompt": "x", "max_tokens": -1},
                    {"model": "tiny-monitor", "prompt": "x", "temperature": -5}):
            assert client.post("/v1/completions", json=bad).status_code == 400
        serving = [e for e in dashboards.expressions() if "_serve_" in e]
        deadline = time.monotonic() + 180
        while (missing := [e for e in serving if not query(prometheus_url, e)]) and time.monotonic() < deadline:
            r = client.post("/v1/completions", json={"model": "tiny-monitor", "prompt": "def g(x):", "max_tokens": 8,
                                                     "temperature": 0.0})
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["completion_tokens"]
            assert client.post("/v1/completions", json={"model": "tiny-monitor", "prompt": "x",
                                                        "max_tokens": -1}).status_code == 400  # the 4xx panel's
            time.sleep(1.0)
        assert not missing, f"serving expressions without data after 180 s of load: {missing}"
    return tokens


def wait_for_series(url: str, exprs: list[str], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    missing = exprs
    while time.monotonic() < deadline:
        missing = [e for e in exprs if not query(url, f"last_over_time({e}[10m])")]
        if not missing:
            time.sleep(3)  # a few more scrapes, for the rate() windows
            return
        time.sleep(1.0)
    raise AssertionError(f"no samples of {missing} after {timeout_s:g} s")


def wait_for_value(url: str, expr: str, at_least: float, timeout_s: float = 180.0) -> None:
    """Until the exported value catches up (processes export every second, Prometheus scrapes every second)."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        result = query(url, expr)
        value = float(result[0]["value"][1]) if result else None
        if value is not None and value >= at_least:
            return
        time.sleep(1.0)
    raise AssertionError(f"{expr} = {value} after {timeout_s:g} s, expected at least {at_least}")


# One phase per fixture, so each test's setup (and its timeout) holds one: Prometheus, then preprocessing,
# training and serving while it scrapes.
@pytest.fixture(scope="module")
def observed(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    from cluster.runtime import session_dir

    require_prometheus()
    root = tmp_path_factory.mktemp("monitor")
    cfg = validate_monitor_config(MonitorConfig(
        monitoring=MonitoringConfig(prometheus_host=f"http://127.0.0.1:{free_port()}"), scrape_interval_s=2.0,
        storage_dir=str(root / "prometheus")))
    with start_monitor(cfg, session_dir()) as prom:
        yield Observed(prom.url, time.time(), str(session_dir()), root)


@pytest.fixture(scope="module")
def preprocessed(observed: Observed, compose) -> dict:
    manifest = preprocess_with_bad_input(compose, observed.root)
    wait_for_series(observed.url, ["ray_moe_data_bad_input_total", "ray_moe_data_documents_per_second"])
    return manifest


@pytest.fixture(scope="module")
def trained(observed: Observed, preprocessed: dict, compose):
    outcome = train_tiny(compose, observed.root)
    wait_for_series(observed.url, ["ray_moe_train_loss", "ray_moe_train_expert_load_max_ratio"])
    return outcome


@pytest.fixture(scope="module")
def served(observed: Observed, trained):
    from ray import serve

    try:
        tokens = serve_load(trained.tracking_uri, observed.url)
        wait_for_series(observed.url, ["ray_moe_serve_time_per_output_token_seconds_count",
                                       'ray_moe_serve_requests_total{status="400"}',
                                       "ray_moe_serve_expert_load_max_ratio", "ray_serve_deployment_replica_healthy"])
        wait_for_value(observed.url, "sum(ray_moe_serve_generated_tokens_total)", tokens)
        wait_for_value(observed.url, 'sum(ray_moe_serve_requests_total{endpoint="completions",status="200"})', 12)
        yield tokens
    finally:
        serve.shutdown()


def values(series: list[dict]) -> list[float]:
    return [float(v) for s in series for _, v in s["values"]]


def test_preprocessing_series_match_the_manifest(observed: Observed, preprocessed: dict) -> None:
    o = observed
    bad = {s["metric"]["reason"]: float(s["value"][1])
           for s in query(o.url, "sum by (reason) (last_over_time(ray_moe_data_bad_input_total[10m]))")}
    assert all(bad.get(reason, 0) >= n for reason, n in preprocessed["bad_input"].items())  # this run's, at least
    assert {"malformed_json", "missing_field", "unreadable_path"} <= bad.keys()
    rate = query(o.url, "max(last_over_time(ray_moe_data_documents_per_second[10m]))")
    assert float(rate[0]["value"][1]) > 0


def test_training_series_show_throughput_and_falling_loss(observed: Observed, trained) -> None:
    o = observed
    tokens_per_s = values(query_range(o.url, "max(ray_moe_train_tokens_per_second)", *o.window()))
    assert tokens_per_s and max(tokens_per_s) > 0
    loss = values(query_range(o.url, "max(ray_moe_train_loss)", *o.window()))
    assert len(set(loss)) >= 2, f"training exported too few loss values to compare: {loss}"
    assert loss[-1] < loss[0] and all(math.isfinite(v) and 0 < v < 10 for v in loss)
    mfu = values(query_range(o.url, "max(ray_moe_train_mfu_ratio)", *o.window()))
    assert mfu and 0 < max(mfu) < 1
    assert {s["metric"]["layer"] for s in query(o.url, "last_over_time(ray_moe_train_expert_load_max_ratio[10m])")}
    world = values(query_range(o.url, "max(ray_moe_train_world_size)", *o.window()))
    assert set(world) == {2.0}


def test_a_training_gauge_stays_exported_between_reports_until_stopped(observed: Observed) -> None:
    """Ray's agent drops a gauge value not set again within two export intervals (2 s here): a training gauge,
    set once per report, must stay in Prometheus until the run's last report stops it, then leave."""
    from pipelines.train.progress import LiveGauges

    name = "moe_test_live_gauge_ratio"  # this test's own series, exported by the test process (a Ray driver)
    gauges = LiveGauges()
    gauges.set(name, 0.25, {}, description="tests/cluster/test_monitor.py")
    wait_for_series(observed.url, [f"ray_{name}"], timeout_s=60)
    time.sleep(8.0)  # 8 export intervals without a set: only the refresh keeps it
    assert query(observed.url, f"ray_{name}"), "the gauge left Prometheus between two sets"
    gauges.set(name, 0.75, {}, description="tests/cluster/test_monitor.py")  # the final report's value,
    gauges.stop(linger_s=6.0)  # set just before the stop, reaches Prometheus
    wait_for_value(observed.url, f"ray_{name}", 0.75, timeout_s=60)
    deadline = time.monotonic() + 60
    while query(observed.url, f"ray_{name}") and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not query(observed.url, f"ray_{name}"), "a stopped gauge is still exported"


def test_serving_series_match_the_load(observed: Observed, served: int) -> None:
    o = observed
    generated = query(o.url, "sum(ray_moe_serve_generated_tokens_total)")
    assert float(generated[0]["value"][1]) >= served > 0
    ok = query(o.url, 'sum(ray_moe_serve_requests_total{endpoint="completions",status="200"})')
    assert float(ok[0]["value"][1]) >= 12  # this test's 12 (a replica of an earlier app may add its own)
    ttft = query(o.url, "histogram_quantile(0.5, sum by (le) (ray_moe_serve_time_to_first_token_seconds_bucket))")
    assert 0 < float(ttft[0]["value"][1]) < 120


def test_every_dashboard_expression_returns_data(observed: Observed, preprocessed: dict, trained, served: int) -> None:
    o = observed
    start, end = o.window()
    empty = [e for e in dashboards.expressions() if not query_range(o.url, e, start, end, step=2.0)]
    assert empty == [], f"dashboard expressions without data: {empty}"
    provisioned = Path(o.session_dir) / "metrics" / "grafana" / "dashboards"
    for uid, board in dashboards.dashboards().items():
        assert json.loads((provisioned / f"{uid.replace('-', '_')}_grafana_dashboard.json").read_text()) == board


def test_dashboards_are_valid_grafana_json() -> None:
    boards = dashboards.dashboards()
    assert set(boards) == {"elastic-moe-training", "elastic-moe-serving", "elastic-moe-preprocessing"}
    for uid, board in boards.items():
        assert board["uid"] == uid and board["schemaVersion"] == dashboards.SCHEMA_VERSION
        assert [p["id"] for p in board["panels"]] == list(range(1, len(board["panels"]) + 1))
        cells = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in board["panels"]}
        assert len(cells) == len(board["panels"])  # no two panels on the same spot
        for panel in board["panels"]:
            assert panel["targets"] and panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
            assert all("moe_" in t["expr"] or "ray_serve_" in t["expr"] for t in panel["targets"])
    titles = [p["title"] for p in boards["elastic-moe-training"]["panels"]]
    assert {"Loss", "Tokens per second", "MFU", "Gradient norm", "World size", "Restarts"} <= set(titles)


def fresh_shell_env() -> dict[str, str]:
    """This environment without the RAY_* variables the session's Ray set (RAY_AUTH_MODE=token among them) or the
    test configuration added: what a user's second terminal has. Where the token lives stays."""
    keep = {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k in keep}


def test_monitor_command_starts_prints_its_url_and_stops_on_ctrl_c(ray_cluster, tmp_path: Path) -> None:
    """As the README says: in a second terminal, the address the dashboard line printed; no variable set by hand
    (the session's token-authenticated Ray is reached with the local token)."""
    import psutil

    require_prometheus()
    port = free_port()
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.monitor", f"ray_address={address}", f"storage_dir={tmp_path}",
         f"monitoring.prometheus_host=http://127.0.0.1:{port}", "scrape_interval_s=1", "dashboards=false"],
        cwd=REPO, env=fresh_shell_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("Prometheus: "):
                break
        assert lines and lines[-1].startswith(f"Prometheus: http://127.0.0.1:{port}"), "".join(lines)
        children = [c for c in psutil.Process(proc.pid).children() if c.name() == "prometheus"]
        assert len(children) == 1
        deadline = time.monotonic() + 30
        while not query(f"http://127.0.0.1:{port}", 'up{job="ray"} == 1') and time.monotonic() < deadline:
            time.sleep(0.5)
        assert query(f"http://127.0.0.1:{port}", 'up{job="ray"} == 1'), "Prometheus does not scrape Ray's agent"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_local_token_is_never_used_for_another_machines_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.runtime import local_cluster_addresses, use_local_token

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    remote = "203.0.113.7:6379"  # TEST-NET-3: no Ray of this machine
    assert remote not in local_cluster_addresses()
    assert use_local_token(remote) is False and "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a mode set by hand is kept
    assert use_local_token(remote) is False and os.environ["RAY_AUTH_MODE"] == "disabled"


def test_a_missing_prometheus_names_the_install_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MonitorError, match=r"apt-get install -y prometheus"):
        find_prometheus("prometheus-not-installed")
    cfg = MonitorConfig(prometheus_bin=str(tmp_path / "prometheus"), storage_dir=str(tmp_path))
    assert run(cfg) == 1  # before it contacts Ray
    assert "apt-get install -y prometheus" in capsys.readouterr().err


def test_the_dashboard_line_says_how_to_log_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.runtime import RayRuntime

    local = RayRuntime("127.0.0.1:6379", "http://127.0.0.1:8265", started_locally=True, resources={})
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what Ray 2.60's ray.init sets for a local cluster
    line = local.dashboard_message()
    assert line is not None and line.startswith("Ray dashboard: http://127.0.0.1:8265 (token authentication is on")
    assert "`ray get-auth-token`" in line and "~/.ray/auth_token" in line
    assert line.endswith("charts: python -m cluster.monitor ray_address=127.0.0.1:6379)")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "token authentication is off (RAY_AUTH_MODE=disabled)" in (local.dashboard_message() or "")
    assert RayRuntime("a", None, started_locally=True, resources={}).dashboard_message() is None


def test_monitoring_settings_become_the_dashboards_environment(compose) -> None:
    from moe.config import ConfigError
    from pipelines.train.config import to_train_config

    cfg = to_train_config(compose("train", ["cluster.monitoring.prometheus_host=http://10.0.0.5:9200",
                                            "cluster.monitoring.grafana_iframe_host=http://grafana.example:3000"]))
    env = cfg.cluster.monitoring.env()
    assert env["RAY_PROMETHEUS_HOST"] == "http://10.0.0.5:9200"
    assert env["RAY_GRAFANA_IFRAME_HOST"] == "http://grafana.example:3000"
    assert env["RAY_GRAFANA_HOST"] == "http://127.0.0.1:3000" and env["RAY_PROMETHEUS_NAME"] == "Prometheus"
    with pytest.raises(ConfigError, match=r"cluster.monitoring.prometheus_host='localhost:9090' is not a URL.*"
                                          r"http://127.0.0.1:9095"):
        to_train_config(compose("train", ["cluster.monitoring.prometheus_host=localhost:9090"]))
