"""Benchmarks: `python -m pipelines.bench NAME [--json] [args...]` runs `pipelines/bench/NAME.py`.

Each benchmark module exposes `run(args: list[str]) -> BenchResult`: rows (dicts printed as a
table) and goals ({goal: {"value", "target", "met"}}), all measured side by side in the same run.
The result types and timing helpers live here so every benchmark measures the same way; the
command line is `pipelines/bench/__main__.py`. Production code never imports this package.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Goal:
    value: float
    target: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


@dataclass
class BenchResult:
    name: str
    rows: list[dict[str, Any]]
    goals: dict[str, Goal] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "goals": {k: {"value": g.value, "target": g.target, "met": g.met} for k, g in self.goals.items()},
            "notes": self.notes,
        }


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
