"""MLflow: the one place runs are created, configs flattened into params, models registered and
registered models resolved back to a local directory (for serving and evaluation).

A relative `sqlite:///mlflow.db` URI is made absolute at the entry point, with artifacts in
`mlruns/` beside the database, so Ray actors whose working directory differs write to the same
store. MLflow is imported inside the functions that use it, so config code (`serve.config`) can
use `absolute_tracking_uri` without importing MLflow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_ARTIFACT_PATH = "model"


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "elastic-moe"
    run_name: str | None = None
    registered_model: str = "elastic-moe"


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _artifact_root(uri: str) -> str | None:
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return str(Path(uri[len(prefix):]).resolve().parent / "mlruns")
    return None


def configure(tracking: TrackingConfig) -> str:
    """Point MLflow at the store and create/select the experiment; returns the absolute URI."""
    import mlflow

    uri = absolute_tracking_uri(tracking.uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(tracking.experiment) is None:
        root = _artifact_root(uri)
        mlflow.create_experiment(tracking.experiment, artifact_location=Path(root).as_uri() if root else None)
    mlflow.set_experiment(tracking.experiment)
    return uri


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dataclasses/dicts/lists -> {"a.b.c": "value"} for MLflow params."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list | tuple) and any(isinstance(v, Mapping) or dataclasses.is_dataclass(v) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = str(obj)[:6000]
    return out


def log_params(params: Mapping[str, str], batch: int = 100) -> None:
    import mlflow

    items = list(params.items())
    for i in range(0, len(items), batch):
        mlflow.log_params(dict(items[i:i + batch]))


def register_model_dir(model_dir: str | Path, registered_name: str, run_id: str) -> int:
    """Log an exported model directory under the run and register it as a new model version."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    client.log_artifacts(run_id, str(model_dir), artifact_path=MODEL_ARTIFACT_PATH)
    try:
        client.get_registered_model(registered_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(registered_name, description="MoE language model trained by elastic-moe")
    run = client.get_run(run_id)
    version = client.create_model_version(
        registered_name, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT_PATH}", run_id=run_id
    )
    return int(version.version)


def download_model(tracking_uri: str, name: str | None = None, version: str | int | None = None,
                   alias: str | None = None, run_id: str | None = None, dst: str | Path | None = None) -> Path:
    """Resolve a registered model (name + version, alias, or latest) or a run's model to a local directory."""
    import mlflow
    from mlflow import MlflowClient

    uri = absolute_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    if run_id is not None:
        source = f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"
    elif name is None:
        raise ValueError("give a registered model name (optionally version or alias) or a run_id.")
    elif alias is not None:
        source = f"models:/{name}@{alias}"
    elif version is not None:
        source = f"models:/{name}/{version}"
    else:
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise LookupError(
                f"no registered model named {name!r} in {uri}; train one with `python -m pipelines.train` "
                "or point at a run id or a local model directory."
            )
        source = f"models:/{name}/{max(int(v.version) for v in versions)}"
    local = mlflow.artifacts.download_artifacts(source, dst_path=str(dst) if dst else None, tracking_uri=uri)
    return Path(local)

