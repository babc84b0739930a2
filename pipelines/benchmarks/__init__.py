"""Benchmarks run by `python -m pipelines.bench NAME`: one module per NAME, each exposing
`run(args: list[str]) -> BenchResult`. Ratios are measured side by side in one run."""
