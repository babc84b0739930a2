"""Grafana dashboards for training, serving and preprocessing, generated from code.

Each dashboard is a list of panels; a panel is a title, a unit and PromQL expressions over the
project's Ray metrics (Prometheus names: `ray_` + the names in `pipelines/train/progress.py`,
`serve/metrics.py`, `pipelines/data/metrics.py`, plus Ray Serve's own replica gauge). `dashboards()`
renders Grafana's dashboard JSON (schema 39, a `datasource` variable defaulting to the Prometheus
datasource Ray provisions); `provision(session_dir)` writes them beside Ray's own dashboards in the
session's Grafana folder (`<session>/metrics/grafana/dashboards`, which Ray's provisioning config
points Grafana at), and `write(directory)` anywhere else (a Grafana sidecar, a ConfigMap).
Tests check the JSON's structure and that every expression returns data from a real Prometheus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 39
RATE = "1m"  # rate() window: at least 4 scrapes at the default 5 s interval + Ray's 5 s export


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana unit id: short, s, percentunit, reqps, ...
    exprs: tuple[tuple[str, str], ...]  # (PromQL, legend)
    description: str = ""


def _by(agg: str, metric: str, labels: str = "") -> str:
    return f"{agg} by ({labels}) ({metric})" if labels else f"{agg}({metric})"


def _quantiles(metric: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{RATE}])))", f"p{int(q * 100)}")
                 for q in (0.5, 0.95, 0.99))


def training_panels() -> list[Panel]:
    g = "ray_moe_train_"
    return [
        Panel("Loss", "short", ((_by("max", g + "loss"), "train"), (_by("max", g + "val_loss"), "validation"))),
        Panel("Tokens per second", "short", ((_by("max", g + "tokens_per_second"), "tokens/s"),),
              "All data-parallel ranks together, averaged over the last log window."),
        Panel("MFU", "percentunit", ((_by("max", g + "mfu_ratio"), "MFU"),),
              "Model FLOPs utilization against the profile's peak (CPU: a measured matmul peak)."),
        Panel("Gradient norm", "short", ((_by("max", g + "grad_norm"), "grad norm"),)),
        Panel("Learning rate", "short", ((_by("max", g + "learning_rate"), "lr"),)),
        Panel("Expert load, max per layer", "short",
              ((_by("max", g + "expert_load_max_ratio", "layer"), "layer {{layer}}"),),
              "Busiest expert's share of the layer's routed tokens times the expert count (1 = balanced)."),
        Panel("Expert load, min per layer", "short",
              ((_by("min", g + "expert_load_min_ratio", "layer"), "layer {{layer}}"),)),
        Panel("Dropped tokens per layer", "percentunit",
              ((_by("max", g + "dropped_tokens_ratio", "layer"), "layer {{layer}}"),),
              "Capacity mode only; dropless training drops nothing."),
        Panel("World size", "short", ((_by("max", g + "world_size"), "workers"),)),
        Panel("Restarts", "short", ((_by("max", g + "restarts"), "restarts"),),
              "Times the run resumed from a checkpoint (failures, elastic resizes)."),
    ]


def serving_panels() -> list[Panel]:
    s = "ray_moe_serve_"
    return [
        Panel("Requests per second", "reqps",
              ((f"sum by (endpoint) (rate({s}requests_total[{RATE}]))", "{{endpoint}}"),)),
        Panel("4xx and 5xx per second", "reqps",
              ((f'sum by (status) (rate({s}requests_total{{status=~"[45].."}}[{RATE}]))', "{{status}}"),)),
        Panel("Queue depth", "short", ((_by("sum", s + "queue_length", "model"), "{{model}} waiting"),)),
        Panel("Running batch size", "short",
              ((_by("sum", s + "active_sequences", "model"), "{{model}} active"),
               (f"sum by (model) (rate({s}batch_size_sum[{RATE}])) / "
                f"sum by (model) (rate({s}batch_size_count[{RATE}]))", "{{model}} mean per forward"))),
        Panel("Generated tokens per second", "short",
              ((f"sum by (model) (rate({s}generated_tokens_total[{RATE}]))", "{{model}}"),)),
        Panel("Time to first token", "s", _quantiles(s + "time_to_first_token_seconds")),
        Panel("Time per output token", "s", _quantiles(s + "time_per_output_token_seconds")),
        Panel("Request duration", "s", _quantiles(s + "request_duration_seconds")),
        Panel("Healthy replicas", "short",
              (("sum by (deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}"),)),
        Panel("Expert load per layer", "short",
              ((_by("max", s + "expert_load_max_ratio", "layer"), "max, layer {{layer}}"),
               (_by("min", s + "expert_load_min_ratio", "layer"), "min, layer {{layer}}"))),
    ]


def preprocessing_panels() -> list[Panel]:
    d = "ray_moe_data_"
    return [
        Panel("Documents per second (last run)", "short", ((_by("max", d + "documents_per_second"), "documents/s"),)),
        Panel("Documents by outcome", "short", ((_by("sum", d + "documents_total", "outcome"), "{{outcome}}"),),
              "read: every record; good: passed reading and filters; kept: also survived dedup."),
        Panel("Bad input by reason", "short", ((_by("sum", d + "bad_input_total", "reason"), "{{reason}}"),)),
        Panel("Dropped by filter", "short",
              ((_by("sum", d + "filtered_documents_total", "filter"), "{{filter}}"),)),
        Panel("Tokens written", "short", ((_by("sum", d + "tokens_total", "split"), "{{split}}"),)),
        Panel("Phase seconds (last run)", "s", ((_by("max", d + "stage_duration_seconds", "stage"), "{{stage}}"),)),
    ]


DASHBOARDS = {  # uid -> (title, panels)
    "elastic-moe-training": ("elastic-moe: training", training_panels),
    "elastic-moe-serving": ("elastic-moe: serving", serving_panels),
    "elastic-moe-preprocessing": ("elastic-moe: preprocessing", preprocessing_panels),
}


def _panel_json(panel: Panel, pid: int) -> dict[str, Any]:
    return {
        "id": pid, "type": "timeseries", "title": panel.title, "description": panel.description,
        "gridPos": {"h": 8, "w": 12, "x": 12 * ((pid - 1) % 2), "y": 8 * ((pid - 1) // 2)},
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (expr, legend) in enumerate(panel.exprs)],
    }


def dashboard_json(uid: str, prometheus_name: str = "Prometheus") -> dict[str, Any]:
    title, panels = DASHBOARDS[uid]
    return {
        "uid": uid, "title": title, "tags": ["elastic-moe"], "schemaVersion": SCHEMA_VERSION, "version": 1,
        "editable": True, "refresh": "5s", "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Data source", "type": "datasource",
                                 "query": "prometheus", "current": {"text": prometheus_name,
                                                                    "value": prometheus_name}}]},
        "panels": [_panel_json(p, i) for i, p in enumerate(panels(), start=1)],
    }


def dashboards(prometheus_name: str = "Prometheus") -> dict[str, dict[str, Any]]:
    """uid -> Grafana dashboard JSON."""
    return {uid: dashboard_json(uid, prometheus_name) for uid in DASHBOARDS}


def expressions() -> list[str]:
    """Every PromQL expression the dashboards chart."""
    return [t["expr"] for d in dashboards().values() for p in d["panels"] for t in p["targets"]]


def write(directory: Path, prometheus_name: str = "Prometheus") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, board in dashboards(prometheus_name).items():
        path = directory / f"{uid.replace('-', '_')}_grafana_dashboard.json"
        path.write_text(json.dumps(board, indent=2))
        paths.append(path)
    return paths


def provision(session_dir: Path, prometheus_name: str = "Prometheus") -> list[Path]:
    """Into the Ray session's Grafana dashboard folder (Grafana started with Ray's grafana.ini loads them)."""
    return write(session_dir / "metrics" / "grafana" / "dashboards", prometheus_name)
