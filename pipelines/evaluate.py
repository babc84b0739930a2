"""`python -m pipelines.evaluate [overrides]`: Hydra -> validated EvaluateConfig -> one evaluation
(or `compare=[A,B]`: two registered versions side by side). The work: pipelines/evaluation/runner.py.

Config errors stop here (`config error: ...`, exit 2) before any model loads; a missing model,
unknown version or unusable input file stops with `error: ...` (exit 1).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from moe.config import ConfigError
from pipelines.core.tables import format_table
from pipelines.evaluation.config import register_configs, to_evaluate_config

register_configs()


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_evaluate_config(dcfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    from pipelines.core.model_source import ModelNotFound
    from pipelines.evaluation.runner import compare_versions, evaluate_model
    from pipelines.evaluation.texts import EvaluationInputError

    try:
        if cfg.compare:
            results, rows = compare_versions(cfg)
        else:
            results = [evaluate_model(cfg)]
            rows = results[0].rows()
    except (ModelNotFound, EvaluationInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(format_table(rows), flush=True)
    for r in results:
        for s in r.samples:
            print(f"--- {r.model.label}: {s['prompt']!r}\n{s['prompt']}{s['completion']}")
        if r.run_id:
            print(f"MLflow record of {r.model.label}: run {r.run_id}")


if __name__ == "__main__":
    main()
