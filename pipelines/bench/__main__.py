"""`python -m pipelines.bench NAME [--json] [args...]`: run one benchmark, print a table or one JSON object."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

import pipelines.bench
from pipelines.bench import BenchResult
from pipelines.core.tables import format_table


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(pipelines.bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__)
    parser.add_argument("name", help=f"benchmark to run: {', '.join(available())}")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args, rest = parser.parse_known_args(argv)
    if args.name not in available():
        parser.error(f"unknown benchmark {args.name!r}; choose one of: {', '.join(available())}")
    module = importlib.import_module(f"pipelines.bench.{args.name}")
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
