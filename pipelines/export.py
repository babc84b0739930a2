"""`python -m pipelines.export [overrides]`: a trained model (model.path, model.run_id or a registered
version) as a directory stock transformers loads without trust_remote_code (moe/hf.py: sigmoid router
-> Glm4MoeForCausalLM, softmax -> Ernie4_5_MoeForCausalLM), logged as artifact `hf` of its run.

Config errors: `config error: ...` (exit 2); a missing model or one no stock class represents
exactly: `error: ...` (exit 1).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from moe.config import ConfigError
from pipelines.evaluation.config import register_configs, to_export_config

register_configs()


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_export_config(dcfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    from moe.hf import UnsupportedModelError
    from pipelines.core.model_source import ModelNotFound
    from pipelines.evaluation.export import run_export

    try:
        outcome = run_export(cfg)
    except (ModelNotFound, UnsupportedModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print("\n".join(outcome.lines()), flush=True)


if __name__ == "__main__":
    main()
