"""Tensor parallelism: attention heads and the dense and shared feed-forward split over a `tp` group,
applied to the one-device model from outside with `torch.distributed.tensor.parallel.parallelize_module`.

Per block (Megatron's column-then-row split; one all-reduce in the forward and one in the backward
of each sub-layer):
- attention: `wq`, `wk`, `wv` column-wise (each rank computes n_heads/tp query heads and
  n_kv_heads/tp key/value heads), `wo` row-wise (partial sums all-reduced to the full hidden
  state). Grouped KV heads stay aligned: rank r holds query heads [r*H/tp, (r+1)*H/tp) and exactly
  the kv heads [r*KV/tp, (r+1)*KV/tp) they read, so `Attention` runs unchanged on its local heads;
  this needs tp to divide n_kv_heads (`check_tensor_parallel`).
- dense feed-forward (`SwiGLU`) and an MoE layer's shared experts: `w1`, `w3` column-wise, `w2` row-wise.
- not split: embedding, norms, head, the router (it sees the full hidden state, which every tp rank
  holds after the row-wise all-reduce) and the routed experts, which are sharded by `ep` and
  replicated over tp (every rank of a tp group routes the same tokens to the same experts).

Weights become DTensors (Shard(0) column-wise, Shard(1) row-wise) on the tp mesh; activations between
sub-layers are plain tensors, identical on every tp rank, and so are the gradients of every
parameter that is not split. Hence the tp ranks of a group read the same micro-batch, and data
parallelism averages each local shard over the dp*ep ranks with the same tp index
(moe/parallel/apply.py, with `local` below giving the shard). Works over any backend DTensor
supports (gloo here, NCCL/RCCL on GPUs); DCP checkpoints reshard DTensors across tp by themselves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from moe.config import ConfigError, ModelConfig
from moe.layers import SwiGLU
from moe.model import MoETransformer
from moe.moe import MoE


def check_tensor_parallel(cfg: ModelConfig, tp: int, prefix: str = "parallel") -> None:
    """ConfigError naming the dimension tp must divide, and the fix."""
    dims = {"model.n_heads": cfg.n_heads, "model.n_kv_heads": cfg.n_kv_heads}
    if cfg.n_dense_layers:
        dims["model.dense_hidden"] = cfg.dense_hidden
    if cfg.n_moe_layers and cfg.moe.n_shared_experts:
        dims["model.moe.n_shared_experts * model.moe.expert_hidden"] = cfg.moe.n_shared_experts * cfg.moe.expert_hidden
    for key, size in dims.items():
        if size % tp:
            divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= 64]
            raise ConfigError(f"{prefix}.tp={tp} does not divide {key}={size} (tensor parallelism splits it evenly); "
                              f"choose {prefix}.tp among {divisors[-4:]}.")


def _swiglu_plan(prefix: str) -> dict[str, ParallelStyle]:
    return {f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(), f"{prefix}.w2": RowwiseParallel()}


def block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    """Module name (inside a block) -> parallel style."""
    plan: dict[str, ParallelStyle] = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
                                      "attn.wv": ColwiseParallel(), "attn.wo": RowwiseParallel()}
    if isinstance(block.ffn, SwiGLU):
        plan.update(_swiglu_plan("ffn"))
    elif isinstance(block.ffn, MoE) and block.ffn.shared is not None:
        plan.update(_swiglu_plan("ffn.shared"))
    return plan


def apply_tensor_parallel(model: MoETransformer, tp_mesh: object) -> None:
    """Split every block this rank holds over `tp_mesh` (a 1-D DeviceMesh), in place; meta or materialized."""
    check_tensor_parallel(model.cfg, tp_mesh.size())
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(block))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor-parallel DTensor (a view, writable); a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_tensor_parallel(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)
