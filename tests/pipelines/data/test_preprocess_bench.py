"""`python -m pipelines.bench data` on a few real files: both sides agree (tokens and the documents
dedup dropped), the table, the scale rows and the goals are complete; the subset pairs' split of
each side's time into fixed cost and marginal rate."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from pipelines.bench.data import Pair, Scaling, edited_copy, run
from pipelines.core.tables import format_table
from pipelines.data.minhash import signature

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_data_benchmark_runs_both_sides_on_the_same_input(ray_cluster) -> None:
    # Two alternating pairs; raises if the two sides' token counts differ.
    result = run(["--files", "12", "--repeats", "2", "--subset-every", "0", "--scale", "2", "data=tiny",
                  "runtime.progress_bars=false"])
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
    # No subset pairs asked for (--subset-every 0): no marginal rows from them.
    assert not [n for n in result.notes if n.startswith("subset pair ")]
    assert "marginal tokens/s" not in stages and "fixed cost per run (s)" not in stages
    # Scale rows: the 12 files x1 and x2 (edited copies kept by dedup: twice the tokens, about).
    x1, x2 = (next(r for r in result.rows if r["stage"] == f"scale x{k}") for k in (1, 2))
    assert 1.8 < x2["tokens"] / x1["tokens"] < 2.3
    assert x1["ray_driver_peak_rss_MB"] > 0 and x2["ray_driver_peak_rss_MB"] > 0
    rss = result.goals["driver_peak_rss_x2_over_x1"]
    assert rss.target == 1.15 and not rss.higher_is_better
    assert rss.value == pytest.approx(x2["ray_driver_peak_rss_MB"] / x1["ray_driver_peak_rss_MB"])
    assert result.goals["scale_marginal_tokens_per_s_vs_plain"].target == 1.8


def test_edited_copies_are_not_near_duplicates() -> None:
    text = (STDLIB / "shlex.py").read_text()
    a, b = edited_copy(text, 1), edited_copy(text, 2)
    assert edited_copy(text, 0) == text and len(a) - len(text) < len(text) // 20
    sigs = [signature(t, 128, 5, 1) for t in (text, a, b)]
    assert max(np.mean(sigs[0] == sigs[1]), np.mean(sigs[1] == sigs[2])) < 0.2


def _pair(tokens: int, ray_s: float, plain_s: float) -> Pair:
    return Pair(tokens=tokens, ray_s=ray_s, ray_phases={}, ray_machine_cpu=None, plain_s=plain_s, plain_stages={},
                plain_cpu=plain_s, plain_machine_cpu=None, load_ray=0.0, load_plain=0.0)


def test_scaling_splits_each_side_into_fixed_cost_and_marginal_rate() -> None:
    # Ray: 3 s for 1,000 tokens, 5 s for 5,000 -> 2,000 tokens/s beyond the subset after 2.5 s fixed.
    # Plain: 2 s and 10 s -> 500 tokens/s, no fixed cost.
    sc = Scaling(subset=_pair(1_000, 3.0, 2.0), full=_pair(5_000, 5.0, 10.0))
    assert sc.measurable
    assert sc.marginal_tokens_per_s("ray") == pytest.approx(2_000)
    assert sc.marginal_tokens_per_s("plain") == pytest.approx(500)
    assert sc.fixed_s("ray") == pytest.approx(2.5)
    assert sc.fixed_s("plain") == pytest.approx(0.0)
    assert sc.marginal_speedup == pytest.approx(4.0)
    # Noise can make the full run no slower than the subset run: then there is no rate to report.
    assert not Scaling(subset=_pair(1_000, 5.0, 2.0), full=_pair(5_000, 5.0, 10.0)).measurable
    assert not Scaling(subset=_pair(5_000, 3.0, 2.0), full=_pair(5_000, 5.0, 10.0)).measurable
