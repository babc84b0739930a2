"""Model export and loading: a self-contained directory with `model.safetensors`, `config.json`
(the `ModelConfig`) and, when given, the tokenizer file. This is what MLflow registers and what
serving loads. (Training checkpoints, with optimizer state and data position, are distributed
checkpoints that reshard across EP degrees: pipelines/checkpointing.py.)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe.config import ModelConfig, MoEConfig
from moe.model import MoETransformer, build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    moe = MoEConfig(**d.pop("moe"))
    return ModelConfig(**d, moe=moe)


def export_model(model: MoETransformer, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write weights (fp32 contiguous copies, persistent buffers included), config and tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(model_config_to_dict(model.cfg), indent=2))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    return out


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
               ) -> MoETransformer:
    """Rebuild an exported model; a missing file names which one and what writes it."""
    d = Path(model_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"{d / name} not found: {d} is not an exported model directory "
                "(pipelines.train writes one per run and logs it to MLflow)."
            )
    cfg = model_config_from_dict(json.loads((d / CONFIG_FILE).read_text()))
    model = build_model(cfg, device=device, dtype=torch.float32, seed=None)
    model.load_state_dict(load_file(str(d / WEIGHTS_FILE), device=str(device)), strict=True)
    return model.to(dtype).eval()
