"""Where a training worker's start spends its time: wall-clock marks from the moment the process began
importing the training stack to the first completed step.

A restart's recovery time (failure to next completed step) is Ray Train's part (noticing the failure,
tearing the group down, placing and starting a new one, its process group) followed by ours, which
`StartTimeline` records on every rank: `import` (the project and what it pulls in; Ray has imported
torch by then), `handoff` (Ray, until it calls the training function), `model` (meta build,
parallelize, materialize), `optimizer_data` (optimizer, schedule, index of the train split and the
global order), `checkpoint_verify` (the manifest checksums), `checkpoint_load` (DCP, trainer state,
ledger), `matmul_peak` (the CPU matmul peak MFU is measured against, or its cached value) and
`first_step`. Rank 0's marks travel with the first report after a restart (`restart/timeline`) into
the restart event (pipelines/train/progress.py: `worker_phases`, and `next_step_at` is the first
step's completion).
"""

from __future__ import annotations

import time

from pipelines.train import IMPORT_STARTED_AT

PHASES = ("import", "handoff", "model", "optimizer_data", "checkpoint_verify", "checkpoint_load", "matmul_peak",
          "first_step")


class StartTimeline:
    """Absolute `time.time()` marks, one per finished phase, after `start` (the import's beginning)."""

    def __init__(self, imported_at: float) -> None:
        self.marks: dict[str, float] = {"start": IMPORT_STARTED_AT, "import": imported_at}

    def mark(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown start phase {phase!r}; one of {PHASES}")
        self.marks.setdefault(phase, time.time())  # the first occurrence ends the phase


def phase_seconds(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase from the marks (each phase ends at its mark, starts at the one before)."""
    names = list(marks)
    return {name: round(marks[name] - marks[prev], 3) for prev, name in zip(names, names[1:], strict=False)}
