"""`python -m pipelines.bench serve`: throughput and latency of the Serve app over real HTTP, with
batching on (engine.max_batch_size=32) and off (=1), with int8 weights (`model.quantization=int8`,
batching on), and a transformers peer on the same weights, at 1, 8 and 32 concurrent clients, in one run.

The model is an exported directory (`--model-dir`), a registered model (`--registered-name`, with
`--tracking-uri`), or by default a freshly initialized `--preset` (conf/model/*.yaml) with a
byte-level BPE trained on a few stdlib files (random weights generate as fast as trained ones; every
request asks for exactly `--max-tokens` tokens with ignore_eos). Both modes use the same replica
resources and limits; only the batch size differs. Both apps are deployed side by side and each
concurrency level runs batched then unbatched back to back, so load from elsewhere on the machine
hits both alike. Goal: batched throughput at 32 clients >= 4x
the unbatched throughput at 32 clients.

The peer (`--peer`, on by default): the same weights exported with `moe.hf.export_hf`, served by stock
transformers `generate` behind a minimal HTTP loop with batching (pipelines/bench/_hf_server.py, its
own process, the same torch threads as our replica's CPUs, the same largest batch). Goal: ours at 32
clients >= 2x its tokens/s. Each row also gives the CPU time the server's processes spent per generated
token during its load (`server_cpu_ms_per_token`; ours: the HTTP proxy, the ingress and the model replica;
the peer: its one process), which the machine's other load changes far less than wall time. The int8 rows are reported beside full precision (int8 / fp32 tokens/s per
level in the notes).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from pipelines.bench import BenchResult, Goal

REPO = Path(__file__).resolve().parents[2]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_dir(preset: str, out: Path) -> Path:
    """A randomly initialized preset with a small byte-level BPE tokenizer, exported for serving."""
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moe.checkpoint import export_model
    from moe.config import ModelConfig
    from moe.model import build_model

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(REPO / "conf" / "model" / f"{preset}.yaml")))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(stdlib / f) for f in ("textwrap.py", "string.py", "fnmatch.py", "shlex.py", "difflib.py")],
              trainers.BpeTrainer(vocab_size=min(2048, cfg.vocab_size), special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    return export_model(build_model(cfg, seed=0).eval(), out / "model", out / "tokenizer.json")


def server_pids(label: str) -> list[int]:
    """Our server's processes for app `bench_{label}`: the HTTP proxy, the ingress and the model replica
    (by the process titles Ray gives its actors)."""
    import psutil

    wanted = ("ray::ProxyActor", f"ray::ServeReplica:bench_{label}:")
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith(wanted)]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far."""
    import psutil

    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def load(base: str, clients: int, requests_per_client: int, prompt: str, max_tokens: int,
         pids: list[int] = ()) -> dict:
    """`clients` threads, each sending its requests one after another; latency per request, and the CPU
    time the server's processes `pids` spent meanwhile (per generated token: a measure of work that other
    load on the machine does not change, unlike wall time)."""
    import httpx

    latencies: list[float] = []
    tokens = 0
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        nonlocal tokens
        with httpx.Client(base_url=base, timeout=600) as c:
            barrier.wait()
            for j in range(requests_per_client):
                body = {"prompt": f"{prompt} # {i}.{j}", "max_tokens": max_tokens, "temperature": 0.8,
                        "seed": i * 1000 + j, "ignore_eos": True}
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/completions", json=body)
                except httpx.HTTPError as err:  # a reset connection is a failed request, not a lost thread
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    latencies.append(dt)
                    tokens += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    cpu0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - cpu0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"requests": len(latencies), "req_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99),
            "server_cpu_ms_per_token": 1000 * cpu / tokens if tokens else float("nan")}


def parse_args(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench serve", description=__doc__)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--registered-name", default=None)
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--preset", default="small", help="conf/model/<preset>.yaml when no model is given")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs for the model replica")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--quantized", default="int8", help="rows with model.quantization=this (none: no rows)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="rows of the transformers peer on the same weights")
    return p.parse_args(args)


def model_dir_of(a: argparse.Namespace, tmp: Path) -> Path:
    """The exported model every server reads."""
    if a.model_dir:
        return Path(a.model_dir)
    if a.registered_name:
        from pipelines.core.model_source import ModelSourceConfig, resolve_model
        from pipelines.core.tracking import TrackingConfig

        return resolve_model(ModelSourceConfig(registered_name=a.registered_name),
                             TrackingConfig(uri=a.tracking_uri)).path
    return make_model_dir(a.preset, tmp)


def deploy_ours(a: argparse.Namespace, model_dir: Path, base: str) -> dict[str, tuple[str, dict]]:
    """Our apps, side by side: label -> (URL, row fields)."""
    from ray import serve

    from serve.app import build_app
    from serve.config import load_config

    apps = {"on": (a.batch_size, "none"), "off": (1, "none")}
    if a.quantized != "none":
        apps[a.quantized] = (a.batch_size, a.quantized)
    out = {}
    for label, (size, quant) in apps.items():
        cfg = load_config([
            f"model.path={model_dir}", f"app_name=bench_{label}", f"engine.max_batch_size={size}",
            "engine.batch_wait_timeout_s=0.005", "deployment.num_replicas=1", f"deployment.num_cpus={a.num_cpus}",
            f"deployment.num_gpus={a.num_gpus}", f"model.device={a.device}", f"model.quantization={quant}",
            "deployment.max_ongoing_requests=256", "deployment.max_queued_requests=-1",
            "engine.max_waiting=1024", "ingress.num_cpus=0.1"])
        serve.run(build_app(cfg), name=f"bench_{label}", route_prefix=f"/{label}", blocking=False)
        fields = {"server": "ours", "batching": "on" if size > 1 else "off", "max_batch": size, "weights": quant}
        out[label] = (f"{base}/{label}", fields)
    return out


def pids_of(targets: dict[str, tuple[str, dict]], peer: subprocess.Popen | None) -> dict[str, list[int]]:
    """Each target's server processes (ours: proxy, ingress, replica; the peer: its one process)."""
    return {label: [peer.pid] if label == "transformers" and peer is not None else server_pids(label)
            for label in targets}


def start_peer(a: argparse.Namespace, model_dir: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    """The transformers peer (pipelines/bench/_hf_server.py) on our weights, exported with moe.hf."""
    import httpx

    from moe.checkpoint import load_model
    from moe.hf import export_hf

    hf_dir = export_hf(load_model(model_dir), tmp / "hf", model_dir / "tokenizer.json")
    port = free_port()
    threads = max(1, int(a.num_cpus))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.bench._hf_server", "--model-dir", str(hf_dir),
                             "--port", str(port), "--max-batch", str(a.batch_size), "--threads", str(threads)],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            httpx.get(f"{url}/health", timeout=5)
            return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the transformers peer server did not start") from None
            time.sleep(1)


def measure(targets: dict[str, tuple[str, dict]], levels: list[int], a: argparse.Namespace, prompt: str,
            pids: dict[str, list[int]]) -> list[dict]:
    """Every target at each concurrency level, back to back (warm-up first)."""
    for url, _ in targets.values():
        load(url, 2, 1, prompt, a.max_tokens)
    rows = []
    for clients in levels:
        n = a.requests_per_client if clients > 1 else 2 * a.requests_per_client
        for label, (url, fields) in targets.items():
            rows.append({**fields, "clients": clients, **load(url, clients, n, prompt, a.max_tokens, pids[label])})
    return rows


def tokens_per_s(rows: list[dict], clients: int, **match: object) -> float:
    return next(r["tokens_per_s"] for r in rows
                if r["clients"] == clients and all(r.get(k) == v for k, v in match.items()))


def run(args: list[str]) -> BenchResult:
    a = parse_args(args)
    levels = [int(x) for x in a.concurrency.split(",")]

    import httpx
    from ray import serve

    from cluster.runtime import RayOptions, start_or_connect

    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    model_dir = model_dir_of(a, Path(tmp.name))
    runtime = start_or_connect(RayOptions(env_vars={"OMP_NUM_THREADS": "1"}, num_cpus=max(4, os.cpu_count() or 1),
                                          log_to_driver=False))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    prompt = "def parse_arguments(argv):\n    parser = argparse.ArgumentParser(description="
    notes: list[str] = []
    peer = None
    try:
        targets = deploy_ours(a, model_dir, base)
        if a.peer:
            peer, peer_url = start_peer(a, model_dir, Path(tmp.name))
            targets["transformers"] = (peer_url, {"server": "transformers", "batching": "on",
                                                  "max_batch": a.batch_size, "weights": "none"})
        rows = measure(targets, levels, a, prompt, pids_of(targets, peer))
        for label in ("on", "off"):
            stats = httpx.get(f"{base}/{label}/stats", timeout=60).json()["model"]
            notes.append(f"batching {label}: mean decode batch {stats['mean_decode_batch_size']:.1f}, "
                         f"max {stats['max_decode_batch_size']}")
    finally:
        if peer is not None:
            peer.kill()
        serve.shutdown()
        runtime.shutdown()  # only a Ray this run started
        tmp.cleanup()
    return result(a, levels, rows, notes)


def result(a: argparse.Namespace, levels: list[int], rows: list[dict], notes: list[str]) -> BenchResult:
    top = max(levels)
    ours = {c: tokens_per_s(rows, c, server="ours", batching="on", weights="none") for c in levels}
    goals = {f"batched_vs_unbatched_throughput_at_{top}_clients":
             Goal(ours[top] / tokens_per_s(rows, top, server="ours", batching="off"), 4.0)}
    if a.peer:
        goals[f"ours_vs_transformers_tokens_per_s_at_{top}_clients"] = Goal(
            ours[top] / tokens_per_s(rows, top, server="transformers"), 2.0)
        cpu = {name: next(r["server_cpu_ms_per_token"] for r in rows if r["clients"] == top and r["server"] == name
                          and r["batching"] == "on" and r["weights"] == "none") for name in ("ours", "transformers")}
        notes.append(f"server CPU ms per generated token at {top} clients (proxy + ingress + replica for ours): ours "
                     f"{cpu['ours']:.2f}, transformers {cpu['transformers']:.2f} (ratio "
                     f"{cpu['transformers'] / cpu['ours']:.2f}: the work per token, which other load on the "
                     "machine changes far less than it changes wall time)")
    if a.quantized != "none":
        notes.append(f"{a.quantized} / full-precision tokens/s: " + ", ".join(
            f"{c} clients {tokens_per_s(rows, c, weights=a.quantized) / ours[c]:.2f}" for c in levels))
    notes.append(f"{a.max_tokens} generated tokens per request; throughput = completion tokens / wall time")
    return BenchResult(name="serve", rows=rows, notes=notes, goals=goals)
