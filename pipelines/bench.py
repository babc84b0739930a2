"""`python -m pipelines.bench NAME [--json] [args...]`: run one benchmark, print a table or one JSON object.

Each benchmark lives in `pipelines/benchmarks/NAME.py` and returns a `BenchResult`: rows (dicts
printed as a table) and goals ({goal: {"value", "target", "met"}}), all measured in the same run.
Timing helpers live here so every benchmark measures the same way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pipelines.benchmarks


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


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols.extend(c for c in r if c not in cols)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(pipelines.benchmarks.__path__))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__)
    parser.add_argument("name", help=f"benchmark to run: {', '.join(available())}")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args, rest = parser.parse_known_args(argv)
    if args.name not in available():
        parser.error(f"unknown benchmark {args.name!r}; choose one of: {', '.join(available())}")
    module = importlib.import_module(f"pipelines.benchmarks.{args.name}")
    result: BenchResult = module.run(rest)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"== {result.name} ==")
        print(format_table(result.rows))
        for note in result.notes:
            print(f"  {note}")
        if result.goals:
            print()
            print(format_table([{"goal": k, "value": g.value, "target": g.target, "met": g.met}
                                for k, g in result.goals.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
