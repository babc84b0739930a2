"""`python -m pipelines.train [overrides]`: Hydra -> validated TrainConfig -> plan -> Ray Train run.

Config errors (unknown keys, wrong types, impossible values) stop here, before Ray starts.
`train.dry_run=true` prints the plan and exits. The run itself: pipelines/train/driver.py (Ray, MLflow,
export) and pipelines/train/worker.py (the Trainer on every worker).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moe.config import ConfigError
from pipelines.train.config import register_configs, to_train_config
from pipelines.train.plan import make_plan

register_configs()


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_train_config(dcfg)
        plan = make_plan(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(plan.lines()), flush=True)
    if cfg.train.dry_run:
        return
    from pipelines.train.driver import TrainingFailed, run_training

    try:
        outcome = run_training(cfg, OmegaConf.to_yaml(dcfg), plan)
    except TrainingFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print("\n".join(outcome.summary_lines()), flush=True)


if __name__ == "__main__":
    main()
