"""Replicas that really scale, over real HTTP against real Ray Serve (tests/serve/conftest.py's instance):
load drives the model deployment from 1 to 2 replicas and, once it drops, back to 1, with zero failed
requests; a replica killed under load loses only the requests it held (each retried by the ingress or
answered with a clear 503) and the deployment recovers. Autoscaling is set to react in about a second
(look-back, metrics interval and delays below), so the test measures behaviour, not Serve's defaults."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

APP = "scale"
REQ = {"prompt": "def run(self):", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
SCALING = ["deployment.autoscaling.min_replicas=1", "deployment.autoscaling.max_replicas=2",
           "deployment.autoscaling.target_ongoing_requests=2", "deployment.autoscaling.look_back_period_s=1",
           "deployment.autoscaling.metrics_interval_s=0.25", "deployment.autoscaling.upscale_delay_s=0.5",
           "deployment.autoscaling.downscale_delay_s=2"]


class Load:
    """Client threads sending completions back to back; every answer's status (and error code) is kept."""

    def __init__(self, url: str) -> None:
        self.url, self.results, self.lock = url, [], threading.Lock()
        self.threads: list[tuple[threading.Thread, threading.Event]] = []

    def _client(self, stop: threading.Event) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not stop.is_set():
                r = c.post("/v1/completions", json=REQ)
                code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
                with self.lock:
                    self.results.append((r.status_code, code))

    def resize(self, n: int) -> None:
        while len(self.threads) > n:
            t, stop = self.threads.pop()
            stop.set()
            t.join()
        while len(self.threads) < n:
            stop = threading.Event()
            t = threading.Thread(target=self._client, args=(stop,), daemon=True)
            t.start()
            self.threads.append((t, stop))

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def wait_answers(self, n: int) -> None:
        """Until `n` answers arrived since the last `take` (requests are slow on a busy machine)."""
        wait_for(lambda: self.count() >= n)

    def take(self) -> Counter:
        with self.lock:
            out, self.results = Counter(self.results), []
        return out


def replicas() -> dict[str, int]:
    """Replicas of the model deployment by state (RUNNING, STARTING, STOPPING...)."""
    from ray import serve

    from serve.deployments import MoEModelServer

    name = MoEModelServer.name
    app = serve.status().applications[APP].deployments[name]
    return {str(state): n for state, n in app.replica_states.items() if n}


def wait_for(cond: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out; replicas: {replicas()}"
        time.sleep(0.25)


def running() -> int:
    return replicas().get("RUNNING", 0)


def replica_actor_names() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#MoEModel")}


@pytest.fixture(scope="module")
def scale_url(server) -> Iterator[str]:
    from ray import serve

    from serve.app import build_app
    from serve.config import load_config

    cfg = load_config([f"tracking.uri={server.models.tracking_uri}", f"model.path={server.models.dirs[2]}",
                       f"app_name={APP}", "model.served_name=tiny-scale", "model.num_threads=1",
                       "deployment.num_cpus=0.5", "ingress.num_cpus=0.05", "ingress.api_key_env=MOE_TEST_UNSET_KEY",
                       "engine.max_batch_size=4", "deployment.max_ongoing_requests=8",
                       "deployment.max_queued_requests=64", "deployment.health_check_period_s=1", *SCALING])
    serve.run(build_app(cfg), name=APP, route_prefix=f"/{APP}", blocking=False)
    try:
        yield f"{server.base}/{APP}"
    finally:
        serve.delete(APP)


def test_load_scales_out_to_two_replicas_and_back_with_no_failed_request(scale_url):
    assert running() == 1
    load = Load(scale_url)
    try:
        load.resize(8)  # 8 ongoing requests against a target of 2 per replica: wants max_replicas
        wait_for(lambda: running() == 2)
        load.wait_answers(16)  # both serve a while
        up = load.take()
        load.resize(1)  # one client: wants 1 replica; the other is drained while traffic goes on
        wait_for(lambda: running() == 1 and not replicas().get("STOPPING"))
        load.wait_answers(1)
        down = load.take()
    finally:
        load.resize(0)
    assert set(up) == {(200, None)} and set(down) == {(200, None)}, (up, down)
    assert up[(200, None)] >= 16 and down[(200, None)] >= 1


def test_killing_a_replica_under_load_loses_only_its_requests_and_recovers(scale_url):
    import ray

    load = Load(scale_url)
    try:
        load.resize(8)
        wait_for(lambda: running() == 2)
        before = replica_actor_names()
        assert len(before) == 2
        load.take()
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        wait_for(lambda: running() == 2 and victim not in replica_actor_names())  # replaced
        load.wait_answers(16)  # the requests in flight at the kill and the next ones have answers
        during = load.take()
        load.wait_answers(8)
        after = load.take()
    finally:
        load.resize(0)
    failed = {k: n for k, n in during.items() if k != (200, None)}
    # the killed replica held at most max_ongoing_requests; each was retried or is a clear 503
    assert set(failed) <= {(503, "replica_unavailable")} and sum(failed.values()) <= 8, during
    assert during[(200, None)] >= 8 and set(after) == {(200, None)}, after
