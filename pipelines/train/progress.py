"""Progress on the console, in MLflow and in the Ray dashboard, from what workers report.

`TrainProgress` is a Ray Train `UserCallback`: it runs in the train controller (on the head node),
receives every `ray.train.report`, prints one progress line per report (forwarded to the driver's
console), logs rank 0's scalar metrics to the MLflow run by global step and sets Ray metrics
(gauges) that the dashboard's metrics view shows.
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

        for key in ("train/loss", "val/loss", "perf/tokens_per_s", "perf/mfu", "train/lr", "train/grad_norm"):
            if key not in scalars:
                continue
            name = "moe_train_" + key.replace("/", "_")
            if name not in self._gauges:
                self._gauges[name] = Gauge(name, description=f"elastic-moe training {key}")
            self._gauges[name].set(scalars[key])
