"""`python -m pipelines.bench fuzz`: thousands of generated requests, good and bad mixed, against a real
Serve app over HTTP, in one run.

Requests come from a seeded generator (`--seed`), so two runs send the same bytes. Good requests are
small completions and chats (greedy, `--max-tokens` tokens); bad ones cover what a client can get
wrong: out-of-range and huge integers, NaN/Infinity, lone UTF-16 surrogates, deep nesting,
truncated or non-UTF-8 bodies, wrong content types and methods, wrong types in a field, oversized
arrays and bodies, unknown endpoints, bad logit_bias keys, requests beyond the context.

Rounds alternate between "good alone" (only the good requests), "mixed" (the same good requests
with the bad ones interleaved) and "harmless" (the same good requests with as many valid, cheap
`GET /v1/models` in the places of the bad ones: the floor of simply sending more requests through
one ingress on a shared machine), `--clients` concurrent clients each, so load from elsewhere on
the machine hits all alike. Goals: zero 5xx over every request of the run, and the p99 latency of the
good requests in the mixed rounds at most 1.2x their p99 alone (medians over the rounds). The
server must answer /health afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.bench import BenchResult, Goal
from pipelines.bench.serve import free_port, make_model_dir, percentile


@dataclass
class Request:
    method: str
    path: str
    body: bytes
    content_type: str = "application/json"
    good: bool = False
    kind: str = "good"


def _json(path: str, obj: object, good: bool = False) -> Request:
    return Request("POST", path, json.dumps(obj).encode(), good=good)


def good_request(rng: random.Random, max_tokens: int) -> Request:
    words = ["def", "parse", "(argv):", "return", "x", "=", "1", "import", "os", "class", "Foo:"]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
    if rng.random() < 0.5:
        return _json("/v1/completions", {"prompt": text, "max_tokens": max_tokens, "temperature": 0,
                                         "ignore_eos": True}, good=True)
    return _json("/v1/chat/completions", {"messages": [{"role": "user", "content": text}],
                                          "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}, good=True)


def _raw(path: str, text: str, content_type: str = "application/json") -> Request:
    return Request("POST", path, text.encode("utf-8", "surrogatepass"), content_type)


BAD_KINDS: dict[str, Callable[[random.Random], Request]] = {
    "negative token id": lambda r: _json("/v1/completions", {"prompt": [5, -r.randint(1, 2**40)]}),
    "huge token id": lambda r: _json("/v1/completions", {"prompt": [5, 2 ** r.randint(31, 200)]}),
    "id beyond vocabulary": lambda r: _json("/detokenize", {"tokens": [1, 10**6 + r.randint(0, 99)]}),
    "lone surrogate": lambda r: _raw(r.choice(["/v1/completions", "/tokenize"]), '{"prompt": "a\\ud800b"}'),
    "surrogate in chat": lambda r: _raw("/v1/chat/completions",
                                        '{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    "NaN / Infinity": lambda r: _raw("/v1/completions", '{"prompt": "x", "temperature": '
                                     + r.choice(["NaN", "Infinity", "-Infinity"]) + "}"),
    "deep nesting": lambda r: _raw("/v1/completions", '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}"),
    "huge integer": lambda r: _raw("/v1/completions", '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}"),
    "truncated body": lambda r: _raw("/v1/chat/completions", '{"messages": [{"role": "us'),
    "not UTF-8": lambda r: Request("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}'),
    "wrong content type": lambda r: _raw("/v1/completions", "prompt=hello", "application/x-www-form-urlencoded"),
    "wrong type in a field": lambda r: _json("/v1/completions", {"prompt": "x", r.choice(
        ["n", "temperature", "max_tokens", "stop", "logprobs", "echo", "seed"]): r.choice([[1], {"a": 1}, "many"])}),
    "oversized array": lambda r: _json("/v1/completions", {"prompt": [1] * 200_000}),
    "oversized body": lambda r: _json("/v1/completions", {"prompt": "x" * (5 * 1024 * 1024)}),
    "unknown endpoint": lambda r: _json("/v1/" + r.choice(["embeddings", "images", "nope"]), {"prompt": "x"}),
    "wrong method": lambda r: Request("GET", "/v1/completions", b""),
    "bad logit_bias": lambda r: _json("/v1/completions", {"prompt": "x", "logit_bias": {
        r.choice(["abc", "-1", "99999999", "1e3"]): 1.0}}),
    "beyond the context": lambda r: _json("/v1/completions", {"prompt": "x", "max_tokens": 10**6}),
    "empty messages": lambda r: _json("/v1/chat/completions", {"messages": []}),
}


def make_requests(seed: int, n_good: int, n_bad: int, max_tokens: int
                  ) -> tuple[list[Request], list[Request], list[Request]]:
    """(good requests; the same good ones with n_bad bad ones interleaved at random; the same good ones
    with n_bad harmless valid requests (GET /v1/models) in the same places: the floor of "more requests")."""
    rng = random.Random(seed)
    good = [good_request(rng, max_tokens) for _ in range(n_good)]
    kinds = sorted(BAD_KINDS)
    bad = []
    for i in range(n_bad):
        req = BAD_KINDS[kinds[i % len(kinds)]](rng)
        req.kind = kinds[i % len(kinds)]
        bad.append(req)
    order = list(range(n_good + n_bad))
    rng.shuffle(order)
    mixed = [(good + bad)[i] for i in order]
    filler = [Request("GET", "/v1/models", b"", kind="harmless GET /v1/models") for _ in range(n_bad)]
    harmless = [(good + filler)[i] for i in order]
    return good, mixed, harmless


@dataclass
class RoundResult:
    statuses: Counter
    good_latencies: list[float]
    wall_s: float
    five_xx: list[str]
    by_kind: dict[str, list[float]]  # latency of every request by kind ("good" or a bad kind)


def send_all(base: str, requests: list[Request], clients: int) -> RoundResult:
    """`clients` threads share the request list in order; every status and each good request's latency."""
    import httpx

    statuses: Counter = Counter()
    latencies: list[float] = []
    five_xx: list[str] = []
    by_kind: dict[str, list[float]] = {}
    lock = threading.Lock()
    it = iter(requests)

    def client() -> None:
        with httpx.Client(base_url=base, timeout=600) as c:
            while True:
                with lock:
                    req = next(it, None)
                if req is None:
                    return
                t0 = time.perf_counter()
                r = c.request(req.method, req.path, content=req.body, headers={"content-type": req.content_type})
                dt = time.perf_counter() - t0
                with lock:
                    statuses[r.status_code] += 1
                    if r.status_code >= 500:
                        five_xx.append(f"{req.method} {req.path} -> {r.status_code}: {r.text[:160]}")
                    by_kind.setdefault(req.kind, []).append(dt)
                    if req.good:
                        latencies.append(dt)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return RoundResult(statuses, latencies, time.perf_counter() - t0, five_xx, by_kind)


def parse_args(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench fuzz", description=__doc__)
    p.add_argument("--good", type=int, default=400, help="good requests per round")
    p.add_argument("--bad", type=int, default=800, help="bad requests mixed into each mixed round")
    p.add_argument("--rounds", type=int, default=2, help="pairs of (good alone, mixed) rounds")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--preset", default="tiny", help="conf/model/<preset>.yaml, randomly initialized")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(args)


def _deploy(model_dir: Path) -> tuple[str, object]:
    from ray import serve

    from cluster.runtime import RayOptions, start_or_connect
    from serve.app import build_app
    from serve.config import load_config

    runtime = start_or_connect(RayOptions(env_vars={"OMP_NUM_THREADS": "1"}, num_cpus=max(4, os.cpu_count() or 1),
                                          log_to_driver=False))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = load_config([f"model.path={model_dir}", "app_name=bench_fuzz", "deployment.num_replicas=1",
                       "deployment.max_ongoing_requests=256", "deployment.max_queued_requests=-1",
                       "engine.max_waiting=1024", "ingress.num_cpus=0.1"])
    serve.run(build_app(cfg), name="bench_fuzz", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}", runtime


def _measure(base: str, a: argparse.Namespace) -> dict[str, list[RoundResult]]:
    good, mixed, harmless = make_requests(a.seed, a.good, a.bad, a.max_tokens)
    send_all(base, good[:16], 2)  # warm-up: compile paths, first batches
    rounds: dict[str, list[RoundResult]] = {"good alone": [], "good + bad mixed": [], "good + harmless mixed": []}
    for _ in range(a.rounds):
        for name, requests in zip(rounds, (good, mixed, harmless)):
            rounds[name].append(send_all(base, requests, a.clients))
    return rounds


def _rows(rounds: dict[str, list[RoundResult]]) -> list[dict]:
    rows = []
    for name, results in rounds.items():
        for i, r in enumerate(results):
            rows.append({"round": f"{name} #{i + 1}", "requests": sum(r.statuses.values()),
                         "2xx": sum(n for s, n in r.statuses.items() if s < 300),
                         "4xx": sum(n for s, n in r.statuses.items() if 400 <= s < 500),
                         "5xx": sum(n for s, n in r.statuses.items() if s >= 500),
                         "good p50_ms": 1000 * statistics.median(r.good_latencies),
                         "good p99_ms": 1000 * percentile(r.good_latencies, 0.99), "wall_s": r.wall_s})
    return rows


def _kind_costs(results: list[RoundResult]) -> str:
    pooled: dict[str, list[float]] = {}
    for r in results:
        for kind, xs in r.by_kind.items():
            pooled.setdefault(kind, []).extend(xs)
    ranked = sorted(((statistics.median(xs), kind) for kind, xs in pooled.items()), reverse=True)
    return ", ".join(f"{kind} {1000 * t:.0f}" for t, kind in ranked)


def run(args: list[str]) -> BenchResult:
    a = parse_args(args)
    import httpx
    from ray import serve

    tmp = tempfile.TemporaryDirectory(prefix="bench_fuzz_")
    base, runtime = _deploy(make_model_dir(a.preset, Path(tmp.name)))
    try:
        rounds = _measure(base, a)
        healthy = httpx.get(f"{base}/health", timeout=60).status_code == 200
    finally:
        serve.shutdown()
        runtime.shutdown()  # only a Ray this run started
        tmp.cleanup()
    alone, with_bad, harmless = rounds.values()
    every = alone + with_bad + harmless
    five_xx = [m for r in every for m in r.five_xx]
    p99 = {name: statistics.median(percentile(r.good_latencies, 0.99) for r in rs) for name, rs in rounds.items()}
    p99_alone, p99_mixed, p99_harmless = p99.values()
    statuses = sum((r.statuses for r in with_bad), Counter())
    notes = [f"{sum(sum(r.statuses.values()) for r in every):,} requests in all; "
             f"{len(BAD_KINDS)} kinds of bad request; statuses of the mixed rounds: {dict(sorted(statuses.items()))}",
             f"/health after the run: {'200' if healthy else 'FAILED'}"]
    notes += [f"5xx: {m}" for m in five_xx[:5]]
    notes.append(f"floor: good p99 with the same number of harmless requests mixed in = {p99_harmless / p99_alone:.2f}x "
                 f"alone; with bad ones {p99_mixed / p99_alone:.2f}x; bad vs harmless {p99_mixed / p99_harmless:.2f}x")
    notes.append("where the mixed rounds' time goes (median latency by kind, ms; all kinds share the 2 cores "
                 "with the client): " + _kind_costs(with_bad))
    if not healthy:
        five_xx.append("/health failed after the run")
    return BenchResult(name="fuzz", rows=_rows(rounds), notes=notes, goals={
        "count_5xx": Goal(float(len(five_xx)), 0.0, higher_is_better=False),
        "good_p99_mixed_vs_alone": Goal(p99_mixed / p99_alone, 1.2, higher_is_better=False)})
