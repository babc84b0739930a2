"""Serving metrics: Ray metrics (exported to Prometheus / the Ray dashboard) plus the in-process
counts behind `GET /stats`, so the numbers a test or a user reads are the ones exported.

Created inside replicas only (ray.util.metrics needs a running Ray worker). Names follow Prometheus
conventions (Prometheus adds the `ray_` prefix): counters end in `_total`, latencies are histograms in
`_seconds`, and labels take values from small fixed sets (endpoint, status code, model, phase, layer),
never a request or a prompt.
"""

from __future__ import annotations

import time
from collections import Counter as CountDict
from collections import deque

from ray.util import metrics

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKEN_LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]


class EngineMetrics:
    """Batch sizes, queue length, active sequences, generated tokens and tokens/s of one replica."""

    def __init__(self, model_name: str) -> None:
        tags = {"model": model_name}
        self.batch_size = metrics.Histogram(
            "moe_serve_batch_size", description="Sequences in one decode forward pass.",
            boundaries=BATCH_BOUNDARIES, tag_keys=("model", "phase"))
        self.batch_size.set_default_tags(tags)
        self.last_batch = metrics.Gauge(
            "moe_serve_last_batch_size", description="Sequences in the latest forward pass (exact value; the "
            "histogram's sum is approximated from bucket midpoints).", tag_keys=("model", "phase"))
        self.last_batch.set_default_tags(tags)
        self.queue_length = metrics.Gauge(
            "moe_serve_queue_length", description="Sequences waiting for a batch slot.", tag_keys=("model",))
        self.queue_length.set_default_tags(tags)
        self.active = metrics.Gauge(
            "moe_serve_active_sequences", description="Sequences in the running batch.", tag_keys=("model",))
        self.active.set_default_tags(tags)
        self.tokens = metrics.Counter(
            "moe_serve_generated_tokens_total", description="Generated tokens.", tag_keys=("model",))
        self.tokens.set_default_tags(tags)
        self.tokens_per_s = metrics.Gauge(
            "moe_serve_tokens_per_second", description="Generated tokens per second (10 s window).",
            tag_keys=("model",))
        self.tokens_per_s.set_default_tags(tags)
        self.ttft = metrics.Histogram(
            "moe_serve_time_to_first_token_seconds", description="From queueing a sequence to its first token.",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("model",))
        self.ttft.set_default_tags(tags)
        self.tpot = metrics.Histogram(
            "moe_serve_time_per_output_token_seconds", description="A finished sequence's time per token after "
            "its first.", boundaries=TOKEN_LATENCY_BOUNDARIES, tag_keys=("model",))
        self.tpot.set_default_tags(tags)
        self.expert_load = {side: metrics.Gauge(
            f"moe_serve_expert_load_{side}_ratio", description=f"The {side}imum expert's share of a MoE layer's "
            "routed tokens since the last report, times the expert count (1 = balanced).", tag_keys=("model", "layer"))
            for side in ("max", "min")}
        for gauge in self.expert_load.values():
            gauge.set_default_tags(tags)
        self.decode_hist: CountDict[int] = CountDict()
        self.prefill_hist: CountDict[int] = CountDict()
        self.total_tokens = 0
        self._window: deque[tuple[float, int]] = deque()

    def observe_step(self, phase: str, batch: int, new_tokens: int, waiting: int, active: int) -> None:
        self.batch_size.observe(batch, tags={"phase": phase})
        self.last_batch.set(batch, tags={"phase": phase})
        (self.decode_hist if phase == "decode" else self.prefill_hist)[batch] += 1
        self.queue_length.set(waiting)
        self.active.set(active)
        if new_tokens:
            self.tokens.inc(new_tokens)
            self.total_tokens += new_tokens
        now = time.monotonic()
        self._window.append((now, new_tokens))
        while self._window and now - self._window[0][0] > 10.0:
            self._window.popleft()
        self.tokens_per_s.set(self.current_tokens_per_s())

    def observe_latency(self, first_token_s: float | None = None, per_token_s: float | None = None) -> None:
        if first_token_s is not None:
            self.ttft.observe(first_token_s)
        if per_token_s is not None:
            self.tpot.observe(per_token_s)

    def observe_expert_load(self, loads: dict[str, list[float]]) -> None:
        """Per MoE layer (id -> routed tokens per expert since the last call): max and min share x experts."""
        for layer, load in loads.items():
            total = sum(load)
            if total > 0:
                self.expert_load["max"].set(max(load) * len(load) / total, tags={"layer": layer})
                self.expert_load["min"].set(min(load) * len(load) / total, tags={"layer": layer})

    def current_tokens_per_s(self) -> float:
        if len(self._window) < 2:
            return 0.0
        span = self._window[-1][0] - self._window[0][0]
        return sum(n for _, n in self._window) / span if span > 0 else 0.0

    def snapshot(self) -> dict:
        decode_steps = sum(self.decode_hist.values())
        return {
            "decode_batch_sizes": {str(k): v for k, v in sorted(self.decode_hist.items())},
            "prefill_batch_sizes": {str(k): v for k, v in sorted(self.prefill_hist.items())},
            "max_decode_batch_size": max(self.decode_hist, default=0),
            "mean_decode_batch_size": (sum(k * v for k, v in self.decode_hist.items()) / decode_steps
                                       if decode_steps else 0.0),
            "generated_tokens": self.total_tokens,
            "tokens_per_s": self.current_tokens_per_s(),
        }


class RequestMetrics:
    """Per-endpoint request count (by status) and latency, recorded by the ingress."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "moe_serve_requests_total", description="HTTP requests by endpoint and status code.",
            tag_keys=("endpoint", "status"))
        self.latency = metrics.Histogram(
            "moe_serve_request_duration_seconds", description="HTTP request latency in seconds (streams: to the end).",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("endpoint",))
        self.completion_tokens = metrics.Counter(
            "moe_serve_completion_tokens_total", description="Completion tokens returned, by endpoint.",
            tag_keys=("endpoint",))
        self.counts: CountDict[str] = CountDict()

    def record(self, endpoint: str, status: int, seconds: float, completion_tokens: int = 0) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.latency.observe(seconds, tags={"endpoint": endpoint})
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens, tags={"endpoint": endpoint})
        self.counts[f"{endpoint} {status}"] += 1


class ExpertLoadMetrics:
    """Per MoE layer, the share of its routed assignments each expert took (the layers' own dispatch
    counters, `MoE.take_load`), published every `engine.expert_load_interval_s`: a gauge with `layer`
    and `expert` labels (both bounded by the model's shape), 1/experts for each when balanced."""

    def __init__(self, model_name: str) -> None:
        self.ratio = metrics.Gauge(
            "moe_serve_expert_load_ratio", description="Share of a MoE layer's routed token assignments that "
            "went to each expert in the last interval (1/n_experts each when balanced).",
            tag_keys=("model", "layer", "expert"))
        self.ratio.set_default_tags({"model": model_name})
        self.last: dict[str, list[float]] = {}  # layer -> share per expert, as last published
        self.totals: dict[str, list[int]] = {}  # layer -> assignments per expert since the replica started

    def observe(self, loads: dict[str, list[int]]) -> None:
        for layer, load in loads.items():
            total = sum(load)
            if not total:
                continue
            shares = [n / total for n in load]
            for e, share in enumerate(shares):
                self.ratio.set(share, tags={"layer": layer, "expert": str(e)})
            self.last[layer] = shares
            prev = self.totals.get(layer, [0] * len(load))
            self.totals[layer] = [a + b for a, b in zip(prev, load)]

    def snapshot(self) -> dict:
        return {"expert_load_ratio": self.last, "expert_assignments": self.totals}
