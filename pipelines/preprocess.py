"""`python -m pipelines.preprocess [data=tiny] [key=value ...]`: corpus -> versioned Parquet shards + manifest.

Thin: Hydra composes and validates `conf/preprocess.yaml` (a bad override fails before Ray
starts), `pipelines.data.pipeline.run_preprocess` does the work, MLflow records the result.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipelines.data.config import register_configs, to_preprocess_config

register_configs()


@hydra.main(config_path="../conf", config_name="preprocess", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipelines.core.tables import format_table
    from pipelines.data.ingest import read_manifest
    from pipelines.data.manifest import report_rows
    from pipelines.data.pipeline import preprocess
    from pipelines.data.report import log_to_mlflow

    pc = to_preprocess_config(cfg)
    out, reused = preprocess(pc)
    m = read_manifest(out)
    print(format_table(report_rows(m)))
    if pc.tracking.enabled:
        log_to_mlflow(pc, out, m, reused=reused)
    print(f"[preprocess] dataset: {out}")


if __name__ == "__main__":
    main()
