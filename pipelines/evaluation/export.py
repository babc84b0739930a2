"""`python -m pipelines.export`: a trained model (path, run or registry) as a directory stock
transformers loads (`moe.hf.export_hf`), optionally logged as artifact `hf` of the model's run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe.checkpoint import load_model
from moe.files import TOKENIZER_FILE
from moe.hf import export_hf, hf_architecture
from pipelines.core import tracking
from pipelines.core.model_source import resolve_model
from pipelines.evaluation.config import ExportConfig

HF_ARTIFACT_PATH = "hf"


@dataclass
class ExportOutcome:
    out_dir: Path
    architecture: str
    label: str
    logged_run_id: str | None

    def lines(self) -> list[str]:
        lines = [f"exported {self.label} as {self.architecture} to {self.out_dir}"]
        if self.logged_run_id:
            lines.append(f"logged as artifact `{HF_ARTIFACT_PATH}` of MLflow run {self.logged_run_id}")
        lines.append(f"load it: AutoModelForCausalLM.from_pretrained({str(self.out_dir)!r}); "
                     f"AutoTokenizer.from_pretrained({str(self.out_dir)!r})")
        return lines


def default_out_dir(label: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label.replace(" v", "-v"))
    return Path("outputs/hf") / safe


def run_export(cfg: ExportConfig) -> ExportOutcome:
    """Resolve, load, refuse what no stock class represents (moe.hf.UnsupportedModelError), write, log."""
    resolved = resolve_model(cfg.model, cfg.tracking)
    model = load_model(resolved.path)
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(resolved.label)
    tokenizer = resolved.path / TOKENIZER_FILE
    export_hf(model, out, tokenizer if tokenizer.is_file() else None, eos_token=cfg.eos_token,
              pad_token=cfg.pad_token)
    logged = None
    if cfg.log_to_run and cfg.tracking.enabled and resolved.run_id:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking.absolute_tracking_uri(cfg.tracking.uri))
        client.log_artifacts(resolved.run_id, str(out), artifact_path=HF_ARTIFACT_PATH)
        logged = resolved.run_id
    return ExportOutcome(out.resolve(), hf_architecture(model.cfg), resolved.label, logged)
