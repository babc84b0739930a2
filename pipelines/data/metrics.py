"""Preprocessing metrics (Ray metrics, scraped by Prometheus with the `ray_` prefix), from a finished
run's manifest: documents read, kept and rejected (bad input by reason, filter drops), tokens written,
the run's documents per second and each phase's seconds. Labels take values from fixed sets (outcome,
reason, filter, split, stage), never a path. Recorded by the driver once per built dataset; a reused
output records nothing.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _metrics() -> dict[str, Any]:
    from ray.util import metrics

    return {
        "documents": metrics.Counter("moe_data_documents_total", tag_keys=("outcome",),
                                     description="Records read (outcome=read), good, and kept after dedup."),
        "bad": metrics.Counter("moe_data_bad_input_total", tag_keys=("reason",),
                               description="Bad input by reason (manifest bad_input)."),
        "filtered": metrics.Counter("moe_data_filtered_documents_total", tag_keys=("filter",),
                                    description="Documents dropped by each quality filter."),
        "tokens": metrics.Counter("moe_data_tokens_total", tag_keys=("split",),
                                  description="Tokens written to the output shards."),
        "rate": metrics.Gauge("moe_data_documents_per_second",
                              description="Records read per second of the last run (whole run)."),
        "stage": metrics.Gauge("moe_data_stage_duration_seconds", tag_keys=("stage",),
                               description="Seconds of each phase of the last run."),
    }


def record_run(info: dict[str, Any]) -> None:
    """Export one finished build's counts (its manifest, `pipelines.data.pipeline.build_manifest`)."""
    m = _metrics()
    for outcome, n in info["records"].items():
        if n:
            m["documents"].inc(n, tags={"outcome": outcome})
    for reason, n in info["bad_input"].items():
        m["bad"].inc(n, tags={"reason": reason})
    for name, n in info["filtered"].items():
        if n:
            m["filtered"].inc(n, tags={"filter": name})
    for split, facts in info["splits"].items():
        if facts["tokens"]:
            m["tokens"].inc(facts["tokens"], tags={"split": split})
    seconds = info["stage_seconds"]
    if seconds.get("total"):
        m["rate"].set(info["records"]["read"] / seconds["total"])
    for stage, value in seconds.items():
        m["stage"].set(value, tags={"stage": stage})
