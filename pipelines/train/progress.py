"""Progress on the console, in MLflow and in the Ray dashboard, from what workers report.

`TrainProgress` is a Ray Train `UserCallback`: it runs in the train controller (on the head node),
receives every `ray.train.report`, prints one progress line per report (forwarded to the driver's
console), sets Ray metrics (gauges, `GAUGES` and `LAYER_GAUGES` below, the world size and restarts among them)
that Prometheus scrapes (`python -m cluster.monitor`) and the Grafana dashboards (`cluster/dashboards.py`)
chart, and keeps the MLflow record of the run as one trajectory:

- rank 0's scalar metrics reach MLflow from the checkpoints, not from the reports: every checkpoint
  carries the metric rows of its trajectory (`metrics.json`), and `sync_metrics` logs the rows above
  the run's mark (tag `metrics.logged_through`) when a report says a checkpoint was committed, when
  a restart resumed from one, and (the driver) at the end. A step trained after the last checkpoint
  and redone after a restart is therefore logged once, from the trajectory that survived, even when
  a failure swallows reports that Ray Train had not yet delivered.
- every restart becomes an event (`restart_event`, an artifact `events/restart-NNN.json` and the
  metrics `restart/*`): its cause (the workers' exception; a resize, which is how Ray Train's elastic
  policy also handles a node lost between two health checks; or `train.resume`), the
  world size before and after, the step it resumed from, the seconds from the failure (or the
  last report before a resize, or the resumed process's start) to the next completed step (when rank 0
  completed it) and where the restarted worker's share of them went (`worker_phases`). A damaged
  checkpoint that was skipped is logged as a warning event and the tag `warning.checkpoint_fallback`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.train import UserCallback

from moe.checkpoint import STEP_PREFIX
from pipelines.train.timeline import phase_seconds

if TYPE_CHECKING:  # mlflow is imported where it is used: the workers import this module (METRICS_FILE,
    # scalar_metrics) and would otherwise pay for importing mlflow, about a second, at every (re)start
    from mlflow import MlflowClient


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


METRICS_FILE = "metrics.json"  # in each checkpoint: the metric rows of its trajectory, by step
MARK_TAG = "metrics.logged_through"


def sync_metrics(client: MlflowClient, run_id: str, checkpoint: Path) -> None:
    """Log the checkpoint's metric rows above the run's mark, then move the mark (idempotent)."""
    from mlflow.entities import Metric

    rows = json.loads((checkpoint / METRICS_FILE).read_text())
    done = int(client.get_run(run_id).data.tags.get(MARK_TAG, -1))
    new = [r for r in rows if r["step"] > done]
    if not new:
        return
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, int(r["step"])) for r in new for k, v in scalar_metrics(r).items() if math.isfinite(v)]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i:i + 500])
    client.set_tag(run_id, MARK_TAG, str(max(int(r["step"]) for r in new)))


def restart_event(m: dict[str, Any], cause: str, since: float, now: float, world_before: int) -> dict[str, Any]:
    """The record of one restart from the first report after it (`restart/*` keys, see the worker).

    `next_step_at` is when rank 0 completed the first step (its timeline; `now`, the report's arrival,
    without one), `worker_phases` the restarted rank 0's seconds per start phase (pipelines/train/timeline.py),
    `worker_started_at` when it began importing the training stack."""
    marks = dict(m.get("restart/timeline") or {})
    done = float(marks.get("first_step", now))
    return {"cause": cause, "world_size_before": int(m.get("restart/world_size_before") or world_before),
            "world_size_after": int(m["world_size"]), "resumed_from_step": int(m["restart/resumed_from"]),
            "first_step_after": int(m["step"]), "seconds_to_next_step": round(done - since, 3),
            "interrupted_at": since, "next_step_at": done, "reported_at": now,
            "worker_started_at": marks.get("start"), "worker_phases": phase_seconds(marks),
            "skipped_checkpoints": list(m.get("restart/skipped_checkpoints") or [])}


class TrainProgress(UserCallback):
    def __init__(self, tracking_uri: str | None, run_id: str | None, total_steps: int, checkpoint_dir: Path,
                 resume_cause: str | None = None) -> None:
        self.tracking_uri, self.run_id, self.total_steps = tracking_uri, run_id, total_steps
        self.checkpoint_dir = checkpoint_dir
        self._client: MlflowClient | None = None
        self._gauges = LiveGauges()
        self._cause, self._since = resume_cause, time.time()  # what interrupted training, and when
        self._world, self._last_report = 0, time.time()
        self.events: list[dict[str, Any]] = []

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        if self._cause is None or not self._cause.startswith("worker failure"):
            ranks = ", ".join(f"rank {r}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                              for r, e in sorted(worker_exceptions.items()))
            self._cause, self._since = f"worker failure ({ranks})", time.time()

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or "step" not in metrics[0]:
            return
        m, now = metrics[0], time.time()
        print(progress_line(m, self.total_steps), flush=True)
        if "restart/resumed_from" in m:
            cause = self._cause or ("resize: the cluster " + ("lost capacity" if m["world_size"] < self._world
                                                               else "has capacity again")
                                    + f", it can host {m['world_size']} workers (was {self._world})")
            since = self._since if self._cause else self._last_report
            self._log_event(restart_event(m, cause, since, now, self._world))
            self._cause = None
        for key in ("restart/resumed_from", "checkpoint/step"):
            if m.get(key):
                self._sync(int(m[key]))
        scalars = scalar_metrics(m)
        self._set_gauges(scalars)
        if int(m["step"]) >= self.total_steps:
            self._gauges.stop()  # the final report: exported a while longer, then its values age out
        self._world, self._last_report = int(m.get("world_size", self._world)), now

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _sync(self, step: int) -> None:
        if not self.run_id:
            return
        try:
            sync_metrics(self._mlflow(), self.run_id, self.checkpoint_dir / f"{STEP_PREFIX}{step:08d}")
        except FileNotFoundError:  # already replaced by a newer checkpoint: that one's sync covers it
            pass

    def _log_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        print(f"[train] restart: {json.dumps(event)}", flush=True)
        if not self.run_id:
            return
        n = len(self._mlflow().list_artifacts(self.run_id, "events"))
        self._mlflow().log_text(self.run_id, json.dumps(event, indent=1), f"events/restart-{n:03d}.json")
        if event["skipped_checkpoints"]:
            self._mlflow().set_tag(self.run_id, "warning.checkpoint_fallback", "; ".join(event["skipped_checkpoints"]))

    def _set_gauges(self, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            name, tags = gauge_name(key)
            if name is not None:
                self._gauges.set(name, value, tags, description=f"elastic-moe training {key}")


GAUGE_REFRESH_S = 1.0  # Ray exports metrics at most once a second
GAUGE_LINGER_S = 30.0  # after the final report: long enough for Prometheus to scrape the final values


class LiveGauges:
    """Ray gauges that stay exported with their last value between two sets, until `stop()`.

    Ray 2.60 exports a gauge's value for about two metric-export intervals after it was set (its metrics
    agent drops a value not refreshed within that time), so gauges set once per training report showed in
    Prometheus as 10 s dashes with 30 s gaps during `make train`, and a value set only once (the final
    report's) can be missed by every scrape. A daemon thread, started with the first gauge, sets every gauge's last
    value again each second from a `set` until `linger_s` after `stop()`. A pickled copy (the callback
    travels to the train controller) starts empty.
    """

    def __init__(self) -> None:
        self._gauges: dict[str, Any] = {}
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._thread: threading.Thread | None = None
        self._live_until = 0.0  # time.monotonic() until which the refresh runs

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return LiveGauges, ()

    def set(self, name: str, value: float, tags: dict[str, str], description: str) -> None:
        from ray.util.metrics import Gauge

        if name not in self._gauges:
            self._gauges[name] = Gauge(name, description=description, tag_keys=tuple(tags))
        self._gauges[name].set(value, tags=tags)
        self._values[(name, tuple(sorted(tags.items())))] = value
        self._live_until = math.inf
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh, name="moe-live-gauges", daemon=True)
            self._thread.start()

    def stop(self, linger_s: float = GAUGE_LINGER_S) -> None:
        """Refresh for `linger_s` more seconds; then each last value leaves within two export intervals."""
        self._live_until = time.monotonic() + linger_s

    def _refresh(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            if time.monotonic() < self._live_until:
                for (name, tags), value in list(self._values.items()):
                    self._gauges[name].set(value, tags=dict(tags))


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
