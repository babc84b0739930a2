"""What the planner's step time needs to know about a CPU host, measured on it between training steps.

A GPU profile states a peak FLOP/s and an expected MFU that stands for everything but communication
and the optimizer; a CPU host states nothing, so `pipelines.bench planner` measures it. CPU ranks
share the host's cores, caches and memory bus, and a shared machine's speed drifts from second to
second: a rate measured alone, or a minute apart, is not the rate a rank gets next to the others
while the step runs. So every rank samples a `HostProbe` after each timed training step, all ranks at
once (a barrier apart), and the planner gets the medians of the slowest rank:

- the FLOP/s one rank's matrix products sustain at their own shapes (`moe.flops.matmul_pass`);
- the seconds per token of the step's other operations: every operation a forward and backward of the
  rank's own model runs that is not a matrix product, attention's fused kernel or a collective (the
  planner models those), recorded under a dispatch mode (`OpTape`) during an untimed step and replayed
  (no autograd, the recorded tensors as inputs): elementwise, normalization, routing, indexing, the
  loss, and under tp DTensor's own dispatch around them;
- the bandwidth an AdamW step reaches (`moe.flops.measure_adamw_bandwidth`).

None of these runs the training step itself or is fitted to its time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moe.config import ModelConfig
from moe.experts import accumulate_expert_grads_in_place
from moe.flops import matmul_pass, measure_adamw_bandwidth
from moe.model import build_meta_model, materialize
from moe.parallel.apply import parallelize
from moe.parallel.mesh import ParallelDims

# what the matrix pass (`moe.flops.matmul_pass`) times: matrix products and attention's fused kernels
MATRIX_OPS = frozenset({
    "aten.mm", "aten.addmm", "aten.addmm_", "aten.bmm", "aten.baddbmm", "aten._grouped_mm",
    "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention_for_cpu_backward",
})
COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor"})


def build_training_model(cfg: ModelConfig, dims: ParallelDims, recompute: str
                         ) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
    """Model, parallel plan and AdamW as training builds them: meta build -> parallelize -> materialize."""
    model = build_meta_model(cfg)
    plan = parallelize(model, dims, device_type="cpu", activation_checkpointing=recompute)
    materialize(model, "cpu", seed=0)
    accumulate_expert_grads_in_place(model)
    return model, plan, torch.optim.AdamW(model.parameters(), lr=1e-4)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of `tokens` (batch x seq + 1)."""
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


class OpTape(TorchDispatchMode):
    """Records every operation but the matrix ones and the collectives, with its inputs, while active (a
    DTensor operation is recorded as such: its replay pays DTensor's dispatch too)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) not in MATRIX_OPS and func.namespace not in COLLECTIVE_NAMESPACES:
            self.ops.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))

    @torch.no_grad()
    def replay_seconds(self) -> float:
        """Seconds of running the recorded operations again, in order, on their recorded inputs."""
        t0 = time.perf_counter()
        for func, args, kwargs in self.ops:
            func(*args, **kwargs)
        return time.perf_counter() - t0


class HostProbe:
    """One rank's three rates (module docstring), sampled between training steps; `medians()` at the end."""

    def __init__(self, cfg: ModelConfig, batch: int, seq_len: int, tp: int, ep: int) -> None:
        self.tokens = batch * seq_len
        self.flops, self._matmuls = matmul_pass(cfg, batch, seq_len, tp, ep)
        self.tape = OpTape()
        self._samples: list[tuple[float, float, float]] = []

    def sample(self) -> None:
        t0 = time.perf_counter()
        self._matmuls()
        matmul_s = time.perf_counter() - t0
        self._samples.append((self.flops / matmul_s, self.tape.replay_seconds() / self.tokens,
                              measure_adamw_bandwidth(steps=3)))

    def medians(self) -> tuple[float, float, float]:
        """(matrix FLOP/s, other operations' seconds per token, AdamW bytes/s)."""
        return tuple(statistics.median(x) for x in zip(*self._samples, strict=True))


@dataclass(frozen=True)
class MeasuredHost:
    """The slowest rank's medians."""

    matmul_flops: float
    other_s_per_token: float
    adamw_bytes_per_s: float

    @classmethod
    def slowest(cls, per_rank: list[tuple[float, float, float]]) -> MeasuredHost:
        return cls(min(r[0] for r in per_rank), max(r[1] for r in per_rank), min(r[2] for r in per_rank))
