"""`python -m pipelines.preprocess`: bad overrides fail before Ray starts; a re-run reuses and logs to MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from pipelines.data.ingest import read_manifest

REPO = Path(__file__).resolve().parents[3]


def _run(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "pipelines.preprocess", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_overrides_fail_before_ray() -> None:
    r = _run("data=tiny", "data.val_fraction=1.5", "tracking.enabled=false")
    assert r.returncode != 0
    assert "data.val_fraction=1.5 must be within [0, 1)" in r.stderr + r.stdout
    assert "Started a local Ray" not in r.stderr + r.stdout
    r = _run("data=tiny", "filters.min_chars=lots")
    assert r.returncode != 0 and "filters.min_chars" in r.stderr + r.stdout
    r = _run("data=tiny", "data.sources=[{kind:csv,path:x}]")
    assert r.returncode != 0 and "data.sources[0].kind='csv'" in r.stderr + r.stdout


def test_rerun_reuses_output_and_logs_manifest_to_mlflow(tiny_dataset: Path, tiny_cfg, tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    r = _run("data=tiny", "data.sources=[{kind:stdlib,max_files:40}]", "runtime.rows_per_shard=1000",
             f"data.output_dir={tiny_cfg.data.output_dir}", f"tracking.uri=sqlite:///{db}",
             "tracking.experiment=data-test", "runtime.progress_bars=false")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"reusing {tiny_dataset}" in out and "Started a local Ray" not in out
    assert "train: sequences" in out  # the report table
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("data-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["dataset_version"] == tiny_dataset.name and run.data.tags["reused"] == "true"
    m = read_manifest(tiny_dataset)
    assert run.data.metrics["train_sequences"] == m["splits"]["train"]["sequences"]
    assert run.data.metrics["records_read"] == m["records"]["read"]
    assert run.data.metrics["filtered_too_short"] == m["filtered"]["too_short"]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "dataset")}
    assert {"dataset/manifest.json", "dataset/tokenizer.json", "dataset/report.md"} <= files
