"""Progress on the console, in MLflow and in the Ray dashboard, from what workers report.

`TrainProgress` is a Ray Train `UserCallback`: it runs in the train controller (on the head node),
receives every `ray.train.report`, prints one progress line per report (forwarded to the driver's
console), logs rank 0's scalar metrics to the MLflow run by global step and sets Ray metrics
(gauges, `GAUGES` and `LAYER_GAUGES` below) that Prometheus scrapes (`python -m cluster.monitor`)
and the Grafana dashboards (`cluster/dashboards.py`) chart.
"""

from __future__ import annotations

import math
import time
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from ray.train import UserCallback


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(m: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {m['step']:>5}/{total_steps}"]
    if "train/loss" in m:
        parts.append(f"loss {m['train/loss']:.4f}")
    if "val/loss" in m:
        parts.append(f"val {m['val/loss']:.4f}")
    if "perf/tokens_per_s" in m:
        parts += [f"lr {m['train/lr']:.2e}", f"{m['perf/tokens_per_s']:,.0f} tok/s",
                  f"MFU {100 * m['perf/mfu']:.2f}%", f"ETA {format_eta(m['eta_s'])}"]
    return "[train] " + " | ".join(parts)


def scalar_metrics(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, int | float) and k != "step"}


class TrainProgress(UserCallback):
    def __init__(self, tracking_uri: str | None, run_id: str | None, total_steps: int) -> None:
        self.tracking_uri, self.run_id, self.total_steps = tracking_uri, run_id, total_steps
        self._client: MlflowClient | None = None
        self._gauges: dict[str, Any] = {}

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or "step" not in metrics[0]:
            return
        m = metrics[0]
        print(progress_line(m, self.total_steps), flush=True)
        scalars = scalar_metrics(m)
        self._log_mlflow(int(m["step"]), scalars)
        self._set_gauges(scalars)

    def _log_mlflow(self, step: int, scalars: dict[str, float]) -> None:
        if not self.run_id:
            return
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in scalars.items() if math.isfinite(v)]
        for i in range(0, len(batch), 500):
            self._client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def _set_gauges(self, scalars: dict[str, float]) -> None:
        from ray.util.metrics import Gauge

        for key, value in scalars.items():
            name, tags = gauge_name(key)
            if name is None:
                continue
            if name not in self._gauges:
                self._gauges[name] = Gauge(name, description=f"elastic-moe training {key}",
                                           tag_keys=tuple(tags))
            self._gauges[name].set(value, tags=tags)


# Reported metric -> Ray gauge (Prometheus adds `ray_`): units or `_ratio` in the name; one `layer` label
# (bounded by the model's MoE layer count) for the per-layer expert statistics.
GAUGES = {"train/loss": "moe_train_loss", "val/loss": "moe_train_val_loss",
          "perf/tokens_per_s": "moe_train_tokens_per_second", "perf/mfu": "moe_train_mfu_ratio",
          "train/lr": "moe_train_learning_rate", "train/grad_norm": "moe_train_grad_norm",
          "train/aux_loss": "moe_train_aux_loss", "train/z_loss": "moe_train_z_loss",
          "world_size": "moe_train_world_size", "train/restarts": "moe_train_restarts",
          "perf/tokens_seen": "moe_train_tokens_seen"}
LAYER_GAUGES = {"max_load": "moe_train_expert_load_max_ratio", "min_load": "moe_train_expert_load_min_ratio",
                "dropped_frac": "moe_train_dropped_tokens_ratio"}


def gauge_name(key: str) -> tuple[str | None, dict[str, str]]:
    """`train/loss` -> ("moe_train_loss", {}); `moe/layer3/max_load` -> ("moe_train_expert_load_max_ratio",
    {"layer": "3"}); None for what is not exported."""
    if key in GAUGES:
        return GAUGES[key], {}
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "moe" and parts[1].startswith("layer") and parts[2] in LAYER_GAUGES:
        return LAYER_GAUGES[parts[2]], {"layer": parts[1].removeprefix("layer")}
    return None, {}
