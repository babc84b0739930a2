"""`python -m pipelines.bench data` on a few real files: both sides agree, the table and goal are complete."""

from __future__ import annotations

import pytest

from pipelines.bench import format_table


def test_data_benchmark_runs_both_sides_on_the_same_input(ray_cluster) -> None:
    from pipelines.benchmarks.data import run

    # Two alternating pairs; raises if the two sides' token counts differ.
    result = run(["--files", "12", "--repeats", "2", "data=tiny", "runtime.progress_bars=false"])
    stages = [r["stage"] for r in result.rows]
    for s in ("read", "normalize", "filter", "hash+minhash", "dedup", "split", "tokenize", "pack", "write",
              "TOTAL (wall)", "tokens/s"):
        assert s in stages
    total = next(r for r in result.rows if r["stage"] == "TOTAL (wall)")
    tps = next(r for r in result.rows if r["stage"] == "tokens/s")
    assert total["plain_s"] > 0 and total["ray_s"] > 0 and tps["plain_s"] > 0 and tps["ray_s"] > 0
    goal = result.goals["ray_vs_plain_tokens_per_s"]
    pairs = [float(n.split(" -> ")[1].split("x;")[0]) for n in result.notes if n.startswith("pair ")]
    assert len(pairs) == 2 and goal.target == 1.6
    assert goal.value == pytest.approx(sum(pairs) / 2, abs=0.006)  # the median of two pairs (notes round to 0.01)
    assert tps["ray_s"] / tps["plain_s"] == pytest.approx(max(pairs), abs=0.006)  # the table: upper-middle pair
    assert "12 files" in " ".join(result.notes)
    assert "tokens/s" in format_table(result.rows)
