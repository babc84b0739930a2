"""`python -m pipelines.finetune [overrides]`: Hydra -> checked FinetuneConfig -> Ray Train run.

Config errors (unknown keys, wrong types, impossible values, settings that break the privacy
guarantee) stop here with `config error: ...` before Ray starts; the run itself is
pipelines/finetune/driver.py (base, data, privacy plan, MLflow, fit, export, register).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moe.config import ConfigError
from pipelines.finetune.config import register_configs, to_finetune_config

register_configs()


@hydra.main(config_path="../../conf", config_name="finetune", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_finetune_config(dcfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    from pipelines.finetune.driver import run_finetune
    from pipelines.train.driver import TrainingFailed

    storage = Path(cfg.train.storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-", dir=storage) as work:
            outcome = run_finetune(cfg, OmegaConf.to_yaml(dcfg), Path(work))
    except (TrainingFailed, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print("\n".join(outcome.summary_lines()), flush=True)


if __name__ == "__main__":
    main()
