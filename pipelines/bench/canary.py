"""`python -m pipelines.bench canary`: measured privacy (issue #18, item 5). Secret canaries inserted
into a fine-tuning set; their exposure (bits, from each canary's loss rank among random secrets of
the same format) after a LoRA fine-tune without DP and with DP-SGD at the target epsilon, same
data, same seed, same steps, in this run (pipelines/finetune/canary.py; one process, no Ray; the
private step is the Ray Train worker's `dp_sgd_step`). Rows: one per arm (mean, min and max
exposure over the canaries, how many rank first, the never-inserted controls' mean, the epsilon
spent, the final training loss, seconds), and with `--repeats N` one per arm and repetition
(canary seeds seed..seed+N-1). Goals: the plain arm's mean exposure at least `--high` bits, and
DP lowers it by at least `--drop` bits (the thresholds the test asserts), in every repetition.
"""

from __future__ import annotations

import argparse

from pipelines.bench import BenchResult, Goal
from pipelines.finetune.canary import CanaryConfig, canary_finetune_config, run_canary_experiment

HIGH_BITS = 8.0  # "high without DP": the plain arm's mean exposure (the cap is log2(candidates + 1))
DROP_BITS = 4.0  # "markedly lower with DP": the drop of the mean exposure


def run(args: list[str]) -> BenchResult:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench canary")
    p.add_argument("--preset", default="tiny", help="model preset (conf/model/), the base at its seeded init")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the canary defaults')")
    p.add_argument("--canaries", type=int, default=CanaryConfig.n_canaries)
    p.add_argument("--insertions", type=int, default=CanaryConfig.insertions)
    p.add_argument("--candidates", type=int, default=CanaryConfig.n_candidates)
    p.add_argument("--filler", type=int, default=CanaryConfig.n_filler)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--high", type=float, default=HIGH_BITS)
    p.add_argument("--drop", type=float, default=DROP_BITS)
    p.add_argument("overrides", nargs="*", help="more fine-tuning overrides (Hydra), e.g. optim.lr=0.005")
    a = p.parse_args(args)
    overrides = [f"+model={a.preset}", f"privacy.target_epsilon={a.epsilon}",
                 *([f"train.steps={a.steps}"] if a.steps else []), *a.overrides]
    cfg = canary_finetune_config(overrides)  # run_canary_experiment leaves it unchanged
    rows, plain_means, drops, notes = [], [], [], []
    for i in range(a.repeats):
        c = CanaryConfig(n_canaries=a.canaries, insertions=a.insertions, n_candidates=a.candidates,
                         n_filler=a.filler, seed=a.seed + i)
        report = run_canary_experiment(cfg, c)
        for arm in report.arms.values():
            rows.append({"seed": c.seed, "arm": f"dp (eps {a.epsilon:g})" if arm.private else "no dp",
                         "exposure bits": round(arm.mean_exposure, 2), "min": round(min(arm.exposure), 2),
                         "max": round(max(arm.exposure), 2),
                         "rank 1": f"{sum(r == 1 for r in arm.rank)}/{len(arm.rank)}",
                         "controls bits": round(arm.mean_control_exposure, 2),
                         "epsilon spent": None if arm.epsilon is None else round(arm.epsilon, 3),
                         "final loss": round(arm.final_loss, 3), "s": round(arm.seconds, 1)})
        plain_means.append(report.arms["plain"].mean_exposure)
        drops.append(report.arms["plain"].mean_exposure - report.arms["dp"].mean_exposure)
        if i == 0:
            notes.append(f"{a.preset}, {report.summary_lines()[0]}; noise multiplier {report.noise_multiplier:.4g}, "
                         f"delta {cfg.privacy.delta:g}")
    goals = {"no_dp_exposure_bits": Goal(min(plain_means), a.high),
             "dp_exposure_drop_bits": Goal(min(drops), a.drop)}
    return BenchResult("canary", rows, goals, notes)
