"""Which model a command reads (serving, evaluation, export): a local directory, an MLflow run, or
a registered version (by number, alias, or the latest). `ModelSourceConfig` is the typed config,
`check_model_source` its checks, `resolve_model` turns it into a local directory plus where it
came from. Every way resolving can fail is a `ModelNotFound` naming what was asked, what exists,
and the fix.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from moe.config import ConfigError, QuantConfig
from moe.files import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from pipelines.core import tracking
from pipelines.core.config import check
from pipelines.core.tracking import TrackingConfig


@dataclass
class ModelSourceConfig:
    """Which model: a local directory, an MLflow run, or the registry (default: its latest version)."""

    path: str | None = None  # an exported model directory (model.safetensors, config.json, tokenizer.json)
    run_id: str | None = None  # an MLflow run that logged the model
    registered_name: str | None = None  # registry name; null: tracking.registered_model
    version: str | None = None  # registry version; null with alias null: the latest version
    alias: str | None = None  # registry alias (e.g. "champion")


def check_model_source(m: ModelSourceConfig) -> None:
    """ConfigError unless the source names one model."""
    given = [k for k in ("path", "run_id") if getattr(m, k)]
    check(len(given) <= 1, f"model.path and model.run_id are both set ({m.path!r}, {m.run_id!r}); give one.")
    check(not (m.version and m.alias), f"model.version={m.version!r} and model.alias={m.alias!r} are both set: "
                                        "set model.version or model.alias, not both (neither: the latest version).")


@dataclass
class QuantizedModelSourceConfig(ModelSourceConfig):
    """A model source that may be quantized at load time (moe/quant.py; serving and evaluation)."""

    quantization: str = "none"  # none | int8 | fp8 (a quantized export loads as saved)
    fp8_block: int = 0  # fp8 scales: 0 one per matrix (per expert), 128: one per 128x128 block
    quant_kernel: str = "auto"  # auto (per device) | int8_mm | scaled_mm | dequant

    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.quantization, self.fp8_block, self.quant_kernel)


def check_quantization(m: QuantizedModelSourceConfig) -> None:
    try:
        m.quant_config().validate()
    except ValueError as err:
        raise ConfigError(str(err)) from err


class ModelNotFound(LookupError):
    """The model named by the config does not exist; the message says what does and how to fix it."""


@dataclass
class ResolvedModel:
    path: Path  # local exported model directory
    label: str  # how tables and run names refer to it: "name v3", "run 1a2b3c", or the directory name
    run_id: str | None = None  # the MLflow run that logged it (None for a local directory)
    registered_name: str | None = None
    version: str | None = None

    @property
    def tokenizer_path(self) -> Path:
        path = self.path / TOKENIZER_FILE
        if not path.is_file():
            raise ModelNotFound(f"{path} not found: the model at {self.path} has no tokenizer; export it with one "
                                "(pipelines.train does) or copy the dataset's tokenizer.json there.")
        return path


def _local(path: str) -> ResolvedModel:
    d = Path(path).expanduser().resolve()
    if not d.is_dir():
        raise ModelNotFound(f"model.path={path}: no such directory; point model.path at an exported model "
                            "directory, or use model.run_id / model.version.")
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE) if not (d / n).is_file()]
    if missing:
        raise ModelNotFound(f"model.path={path} lacks {', '.join(missing)}: it is not an exported model directory "
                            "(pipelines.train writes one per run and logs it to MLflow).")
    return ResolvedModel(d, d.name)


def _download_dir(dst: str | Path | None) -> Path:
    return Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="elastic-moe-model-"))


def _from_run(client, uri: str, run_id: str, dst: str | Path | None) -> ResolvedModel:
    import mlflow

    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise ModelNotFound(f"model.run_id={run_id}: no such run in {uri}; copy the id from `mlflow ui` or use "
                            "model.version / model.path.") from err
    try:
        path = tracking.download_model(uri, run_id=run_id, dst=_download_dir(dst))
    except (OSError, mlflow.exceptions.MlflowException) as err:
        raise ModelNotFound(f"run {run_id} logged no model (artifact `{tracking.MODEL_ARTIFACT_PATH}`); "
                            "it did not finish training, or pick another run.") from err
    return ResolvedModel(path, f"run {run_id[:8]}", run_id)


def _version(client, uri: str, name: str, src: ModelSourceConfig):
    import mlflow

    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        names = sorted(m.name for m in client.search_registered_models()) or ["none"]
        raise ModelNotFound(f"no registered model named {name!r} in {uri} (registered: {', '.join(names)}); train "
                            "one with `python -m pipelines.train`, set model.registered_name, or use model.path.")
    if src.alias:
        try:
            return client.get_model_version_by_alias(name, src.alias)
        except mlflow.exceptions.MlflowException as err:
            raise ModelNotFound(f"model.alias={src.alias!r}: {name!r} has no such alias; set it in the registry "
                                "or use model.version.") from err
    by_number = {str(v.version): v for v in versions}
    if src.version is None:
        return by_number[str(max(int(v) for v in by_number))]
    if str(src.version) not in by_number:
        have = ", ".join(sorted(by_number, key=int))
        raise ModelNotFound(f"model.version={src.version}: {name!r} has no such version (versions: {have}).")
    return by_number[str(src.version)]


def resolve_model(src: ModelSourceConfig, tracking_cfg: TrackingConfig, dst: str | Path | None = None
                  ) -> ResolvedModel:
    """The model `src` names, as a local directory (downloaded from MLflow into `dst` or a temporary one)."""
    if src.path:
        return _local(src.path)
    from mlflow import MlflowClient

    uri = tracking.absolute_tracking_uri(tracking_cfg.uri)
    client = MlflowClient(tracking_uri=uri)
    if src.run_id:
        return _from_run(client, uri, src.run_id, dst)
    name = src.registered_name or tracking_cfg.registered_model
    mv = _version(client, uri, name, src)
    path = tracking.download_model(uri, name=name, version=mv.version, dst=_download_dir(dst))
    return ResolvedModel(path, f"{name} v{mv.version}", mv.run_id, name, str(mv.version))
