"""MLflow record of a preprocessing output: params, counts as metrics, manifest/tokenizer/report artifacts."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow

from pipelines.core.tracking import configure, flatten, log_params
from pipelines.data.config import PreprocessConfig
from pipelines.data.manifest import MANIFEST_FILE, hashed_config, report_rows


def report_markdown(m: dict[str, Any]) -> str:
    from pipelines.core.tables import format_table

    return f"# Dataset {m['version']}\n\n```\n{format_table(report_rows(m))}\n```\n"


def log_to_mlflow(cfg: PreprocessConfig, dataset_dir: Path, m: dict[str, Any], reused: bool = False) -> str:
    """One MLflow run per call (also for a reused output, tagged reused); returns the run id."""
    configure(cfg.tracking)
    with mlflow.start_run(run_name=f"preprocess-{m['version']}") as run:
        mlflow.set_tags({"stage": "preprocess", "dataset_version": m["version"], "dataset_dir": str(dataset_dir),
                         "config_hash": m["config_hash"], "tokenizer_sha256": m["tokenizer_sha256"],
                         "reused": str(reused).lower()})
        log_params(flatten(hashed_config(cfg)))
        metrics: dict[str, float] = {"records_read": m["records"]["read"], "records_kept": m["records"]["kept"]}
        for split, s in m["splits"].items():
            for k in ("documents", "sequences", "tokens"):
                metrics[f"{split}_{k}"] = s[k]
        metrics.update({f"bad_{k}": v for k, v in m["bad_input"].items()})
        metrics.update({f"filtered_{k}": v for k, v in m["filtered"].items()})
        metrics.update({f"dedup_{k}": m["dedup"][k] for k in ("exact_rate", "near_rate", "total_rate")})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(dataset_dir / MANIFEST_FILE), artifact_path="dataset")
        mlflow.log_artifact(str(dataset_dir / m["tokenizer_file"]), artifact_path="dataset")
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "report.md"
            p.write_text(report_markdown(m))
            mlflow.log_artifact(str(p), artifact_path="dataset")
        mlflow.log_table({"what": [r["what"] for r in report_rows(m)], "count": [r["count"] for r in report_rows(m)]},
                         artifact_file="dataset/report.json")
        return run.info.run_id
