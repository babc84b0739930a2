"""Activation recomputation (checkpointing), applied to the one-device model from outside.

Modes (`train.activation_checkpointing`):
- `none`: every intermediate activation is kept for the backward.
- `moe`:  each MoE feed-forward (router, routed and shared experts) keeps only its input and runs
          again in the backward: the routed experts' per-assignment hidden states (top_k x expert
          width per token) are usually the largest activations of an MoE model.
- `full`: every block keeps only its input; attention and feed-forward run again in the backward.

The wrapped module's `forward` is replaced by one that runs the original under
`torch.utils.checkpoint` (non-reentrant), so parameter names, state dicts and hooks are unchanged.
A recomputed MoE layer would count its routed tokens twice and overwrite its logged losses; the
recompute context restores the counters and losses the first forward left, so load balancing,
dropped-token fractions and logging see each token once. Collectives inside (expert all-to-all,
tensor-parallel all-reduces) run again in the backward, on every rank alike.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe.config import ConfigError
from moe.model import MoETransformer
from moe.moe import MoE

MODES = ("none", "moe", "full")


class _KeepMoEState:
    """Context: the MoE layers' counters and logged losses are what they were on entry when it exits."""

    def __init__(self, layers: list[MoE]) -> None:
        self.layers = layers

    def __enter__(self) -> None:
        self.saved = [(m.tokens_per_expert.clone(), m.routed_tokens.clone(), m.dropped_tokens.clone(),
                       m.last_aux_loss, m.last_z_loss) for m in self.layers]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for m, (tokens, routed, dropped, aux, z) in zip(self.layers, self.saved, strict=True):
                m.tokens_per_expert.copy_(tokens)
                m.routed_tokens.copy_(routed)
                m.dropped_tokens.copy_(dropped)
                m.last_aux_loss, m.last_z_loss = aux, z


def _checkpointed(module: nn.Module) -> Callable:
    forward = module.forward
    layers = [m for m in module.modules() if isinstance(m, MoE)]

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _KeepMoEState(layers)

    @functools.wraps(forward)
    def run(*args: object, **kwargs: object) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation and decoding: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


def check_mode(mode: str, key: str = "train.activation_checkpointing") -> str:
    if mode not in MODES:
        raise ConfigError(f"{key}={mode!r}: use one of {', '.join(MODES)}.")
    return mode


def apply_activation_checkpointing(model: MoETransformer, mode: str) -> list[str]:
    """Wrap the blocks (`full`) or MoE feed-forwards (`moe`) this model holds; returns the wrapped names."""
    check_mode(mode)
    wrapped = []
    for name, block in model.layers.items():
        target = block if mode == "full" else block.ffn if mode == "moe" and isinstance(block.ffn, MoE) else None
        if target is not None:
            target.forward = _checkpointed(target)
            wrapped.append(f"layers.{name}" + ("" if mode == "full" else ".ffn"))
    return wrapped
