"""LoRA adapters applied to a `MoETransformer` from outside, like the parallel styles: `apply_lora`
attaches them, `merge_lora` / `unmerge_lora` fold them into the base weights and back (exactly),
`remove_lora` takes them off again; the model code never branches on them.

Targets (`LoRAConfig.targets`):
    attn        the attention projections wq, wk, wv, wo (nn.Linear)
    dense_ffn   the dense layers' SwiGLU w1, w3, w2 (nn.Linear)
    shared_ffn  the MoE layers' shared experts w1, w3, w2 (nn.Linear)
    experts     the routed experts' 3-D weights: per expert, gate and up share one A (E, D, r) with
                one B over both (E, r, 2H: gate columns, then up), the down projection has its own
                A (E, H, r) and B (E, r, D). This is exactly a LoRA of transformers' fused
                `gate_up_proj` and `down_proj`, so the adapter exports to peft as it is.
A linear adapter (A (r, in), B (out, r), in nn.Linear's layout) adds scale * B A dropout(x) to the
module's output: it replaces the module's `forward` (an instance attribute) by `LoRALinear`, which adds
the low-rank terms onto the base GEMMs' outputs, forward and backward. The expert adapter replaces
the experts' local compute (`GroupedExperts.local_gather_combine`, also what expert parallelism
calls on the expert rank) by `LoRAExperts`: the per-expert kernel of moe/experts.py with each
expert's low-rank terms added onto its base GEMMs, on the rows routed to that expert only (W + dW
is never formed), and a hand-written backward that computes no gradient of the frozen base weights.
The routed rows carry their combine weight into the down projection as the base kernel does.
`scale = alpha / rank`; B starts at zero, A from a generator seeded by
the seed and the module's name, drawn whole and sliced to the local experts, so every layout
(any EP degree, any pipeline stage) starts from the one-device values.

Only the adapters train: every base parameter is frozen, the router's gate and the embeddings and
head too unless `train_router` / `train_embeddings` say otherwise. `trainable_fraction` counts
the adapter parameters of the whole (unsharded) model against all its parameters.

Per-example gradients (differential privacy): while a `PerExampleCapture` is active, the backward
of the linear adapters' autograd function (`LoRALinear`) and of the expert kernel (`LoRAExperts`) also
writes each example's gradient of A and B into `param.grad_sample` (examples x param shape, through
one `SampleSink`), exactly the gradient that example alone would give.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ConfigError
from moe.experts import GroupedExperts, expert_slices
from moe.layers import Attention, SwiGLU
from moe.model import MoETransformer

TARGETS = ("attn", "dense_ffn", "shared_ffn", "experts")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    train_router: bool = False  # the router's gate weight trains in full (off: frozen)
    train_embeddings: bool = False  # the token embedding and the head train in full (off: frozen)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, prefix: str = "lora") -> LoRAConfig:
        if self.rank <= 0:
            raise ConfigError(f"{prefix}.rank={self.rank} must be positive (e.g. 8).")
        if self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha={self.alpha} must be positive (e.g. 2 x rank).")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.dropout={self.dropout} must be within [0, 1).")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"{prefix}.targets={list(self.targets)}: choose a non-empty subset of {list(TARGETS)}.")
        return self


# ---- per-example gradients ----------------------------------------------------------------------
class PerExampleCapture:
    """While active (`capture_per_example`), the adapters' backward adds each example's A and B gradients into
    `param.grad_sample`. Rows of a flattened (tokens, features) input belong to example
    `row // tokens_per_example` (the batch is (n_examples, tokens_per_example) tokens)."""

    def __init__(self, n_examples: int, tokens_per_example: int) -> None:
        self.n_examples, self.tokens_per_example = n_examples, tokens_per_example

    def add(self, param: torch.Tensor, index: int | None, sample: torch.Tensor) -> None:
        """Add (n_examples, *shape) into param.grad_sample (or its slice `index` along the expert dim)."""
        if getattr(param, "grad_sample", None) is None:
            param.grad_sample = param.new_zeros(self.n_examples, *param.shape)
        target = param.grad_sample if index is None else param.grad_sample[:, index]
        target.add_(sample.to(param.dtype))


_CAPTURE: list[PerExampleCapture] = []  # the active capture (at most one), set by `capture_per_example`


@contextmanager
def capture_per_example(n_examples: int, tokens_per_example: int) -> Iterator[PerExampleCapture]:
    """Forward and backward inside this context fill `grad_sample` of every adapter parameter."""
    cap = PerExampleCapture(n_examples, tokens_per_example)
    _CAPTURE.append(cap)
    try:
        yield cap
    finally:
        _CAPTURE.remove(cap)


@dataclass
class SampleSink:
    """Where an adapter's per-example gradients go: the parameters, the expert index (None for a
    linear adapter, whose A/B are stored transposed), and each row's example id."""

    capture: PerExampleCapture
    a: nn.Parameter
    b: nn.Parameter
    expert: int | None
    example_N: torch.Tensor

    def write(self, x_NI: torch.Tensor, z_NR: torch.Tensor, g_NO: torch.Tensor, gz_NR: torch.Tensor,
              scale: float) -> None:
        n = self.capture.n_examples
        if self.expert is None:  # rows are contiguous per example: one batched GEMM each
            x, z = x_NI.view(n, -1, x_NI.shape[-1]), z_NR.view(n, -1, z_NR.shape[-1])
            g, gz = g_NO.view(n, -1, g_NO.shape[-1]), gz_NR.view(n, -1, gz_NR.shape[-1])
            self.capture.add(self.a, None, scale * torch.einsum("btr,bti->bri", gz, x))
            self.capture.add(self.b, None, scale * torch.einsum("bto,btr->bor", g, z))
            return
        da = x_NI.new_zeros(n, x_NI.shape[1] * z_NR.shape[1])
        da.index_add_(0, self.example_N, (x_NI.unsqueeze(2) * gz_NR.unsqueeze(1)).flatten(1))
        db = x_NI.new_zeros(n, z_NR.shape[1] * g_NO.shape[1])
        db.index_add_(0, self.example_N, (z_NR.unsqueeze(2) * g_NO.unsqueeze(1)).flatten(1))
        self.capture.add(self.a, self.expert, scale * da.view(n, x_NI.shape[1], -1))
        self.capture.add(self.b, self.expert, scale * db.view(n, z_NR.shape[1], -1))


class LoRALinear(torch.autograd.Function):
    """A frozen nn.Linear with its adapter in one function: y = x W^T (+ bias) + scale * (m x) A^T B^T
    for rows x (N, in), W (out, in), A (r, in), B (out, r) and the dropout mask m of the low-rank input
    (or none). The low-rank term is added onto the base GEMM's output in place, and backward adds the
    low-rank input gradient onto the base one (dx = g W + scale * m (g B) A), so the adapter costs no
    extra (N, in) or (N, out) tensor; no gradient of W or the bias (frozen). With a `SampleSink` the
    backward also writes every example's gradient of A and B."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,  # noqa: D102
                b: torch.Tensor, scale: float, mask: torch.Tensor | None, sink: SampleSink | None) -> torch.Tensor:
        xm = x if mask is None else x * mask
        z = xm @ a.t()
        y = F.linear(x, w, bias).addmm_(z, b.t(), alpha=scale)
        ctx.save_for_backward(xm, w, a, b, z, *(() if mask is None else (mask,)))
        ctx.scale, ctx.sink = scale, sink
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        xm, w, a, b, z, *mask = ctx.saved_tensors
        s = ctx.scale
        gz = g @ b  # (N, r)
        if ctx.sink is not None:
            ctx.sink.write(xm, z, g, gz, s)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g @ w
            if mask:
                dx.add_((gz @ a).mul_(mask[0]), alpha=s)
            else:
                dx.addmm_(gz, a, alpha=s)
        da = torch.mm(gz.t(), xm).mul_(s) if ctx.needs_input_grad[3] else None
        db = torch.mm(g.t(), z).mul_(s) if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db, None, None, None


def _active_capture() -> PerExampleCapture | None:
    return _CAPTURE[-1] if _CAPTURE else None


# ---- adapters -----------------------------------------------------------------------------------
def _seeded(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _kaiming_a(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """peft's default A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.rand(shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound


class LinearAdapter(nn.Module):
    """LoRA of one nn.Linear: A (r, in), B (out, r); adds scale * B A dropout(x) to its output."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig, name: str, seed: int) -> None:
        super().__init__()
        dev, dtype = base.weight.device, base.weight.dtype
        r, fan_in = cfg.rank, base.in_features
        self.A = nn.Parameter(_kaiming_a((r, fan_in), fan_in, _seeded(seed, name)).to(dev, dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dtype))
        self.scale, self.dropout, self.merged = cfg.scale, cfg.dropout, False
        self.original: torch.Tensor | None = None
        self.base = [base]  # a list: not a submodule (the adapter is the base's child)
        base.forward = self.forward_base  # instance attribute: the base's calls run the adapted projection

    def forward_base(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted projection of x (..., in) -> (..., out)."""
        base = self.base[0]
        if self.merged:
            return nn.Linear.forward(base, x)
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            raise ValueError("a linear adapter computes no gradient of its base weight, which LoRA freezes; "
                             "unfreeze it only after remove_lora(model).")
        x_NI = x.reshape(-1, x.shape[-1])
        mask = None
        if self.dropout and self.training:  # dropout of the low-rank input
            keep = 1.0 - self.dropout
            mask = x_NI.new_empty(x_NI.shape).bernoulli_(keep).div_(keep)
        cap = _active_capture()
        sink = None if cap is None else SampleSink(cap, self.A, self.B, None, torch.empty(0))
        y = LoRALinear.apply(x_NI, base.weight, base.bias, self.A, self.B, self.scale, mask, sink)
        return y.view(*x.shape[:-1], y.shape[-1])

    def delta(self) -> torch.Tensor:
        """The weight update in nn.Linear's layout (out, in)."""
        return (self.B @ self.A) * self.scale


class ExpertAdapter(nn.Module):
    """LoRA of a `GroupedExperts` (this rank's experts): A13 (E, D, r) shared by gate and up, B13
    (E, r, 2H), A2 (E, H, r), B2 (E, r, D); computed on each expert's routed rows only."""

    def __init__(self, experts: GroupedExperts, cfg: LoRAConfig, name: str, seed: int) -> None:
        super().__init__()
        w = experts.w1
        dev, dtype, r = w.device, w.dtype, cfg.rank
        total, first, n = experts.shard.total, experts.shard.first, experts.n_experts
        d, h = experts.d_model, experts.hidden
        a13 = _kaiming_a((total, d, r), d, _seeded(seed, name + ".A13"))[first:first + n]
        a2 = _kaiming_a((total, h, r), h, _seeded(seed, name + ".A2"))[first:first + n]
        self.A13 = nn.Parameter(a13.to(dev, dtype))
        self.B13 = nn.Parameter(torch.zeros(n, r, 2 * h, device=dev, dtype=dtype))
        self.A2 = nn.Parameter(a2.to(dev, dtype))
        self.B2 = nn.Parameter(torch.zeros(n, r, d, device=dev, dtype=dtype))
        self.scale, self.dropout, self.merged = cfg.scale, cfg.dropout, False
        self.original: tuple[torch.Tensor, ...] | None = None
        self.experts = [experts]  # a list: not a submodule (the adapter is the experts' child)
        experts.local_gather_combine = self.gather_combine  # instance attribute: the seam EP calls too

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-expert weight updates in GroupedExperts' layout: (dw1, dw3, dw2)."""
        d13 = torch.bmm(self.A13, self.B13) * self.scale
        h = d13.shape[-1] // 2
        return d13[..., :h], d13[..., h:], torch.bmm(self.A2, self.B2) * self.scale

    def gather_combine(self, x_TD: torch.Tensor, token_N: torch.Tensor, counts_E: torch.Tensor,
                       weight_N: torch.Tensor) -> torch.Tensor:
        """y_TD[t] = sum over rows n of token t of weight_N[n] * (adapted expert)(x_TD[t])."""
        experts = self.experts[0]
        if self.merged or x_TD.shape[0] == 0:
            return GroupedExperts.local_gather_combine(experts, x_TD, token_N, counts_E, weight_N)
        if any(w.requires_grad for w in (experts.w1, experts.w3, experts.w2)):
            raise ValueError("the expert adapter's kernel computes no gradients of the base expert weights, which "
                             "LoRA freezes; unfreeze them only after remove_lora(model).")
        masks = None
        if self.dropout and self.training:  # dropout of the low-rank inputs, drawn per routed row
            n, keep = int(counts_E.sum()), 1.0 - self.dropout
            masks = tuple(x_TD.new_empty(n, k).bernoulli_(keep).div_(keep) for k in (experts.d_model, experts.hidden))
        return LoRAExperts.apply(x_TD, token_N, weight_N, self.A13, self.B13, self.A2, self.B2, experts.w1,
                                 experts.w3, experts.w2, counts_E.tolist(), self.scale, masks, self)


class LoRAExperts(torch.autograd.Function):
    """`GroupedExperts`' per-expert SwiGLU kernel (moe/experts.py) with the expert adapter's low-rank
    terms added onto each base GEMM's output. Per expert e, over the rows routed to it (each reads its
    token of x; the outputs are added to their tokens, weighted):
        z1 = m1 x A13[e],  a = x W1[e] + s z1 B13[e][:, :H],  b = x W3[e] + s z1 B13[e][:, H:]
        h = w * silu(a) * b,  z2 = (m2 h) A2[e],  y = h W2[e] + s z2 B2[e]
    (m1, m2: the dropout masks of the low-rank inputs, or none). The base weights are frozen: backward
    computes the input, combine-weight and adapter gradients only, per expert on L2-sized temporaries,
    and, while a `PerExampleCapture` is active, every example's adapter gradient (`SampleSink`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_N: torch.Tensor, w_N: torch.Tensor,  # noqa: D102
                a13: torch.Tensor, b13: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, w1: torch.Tensor,
                w3: torch.Tensor, w2: torch.Tensor, counts: list[int], scale: float,
                masks: tuple[torch.Tensor, torch.Tensor] | None, adapter: ExpertAdapter) -> torch.Tensor:
        x = x.contiguous()
        n_rows, hidden, rank = sum(counts), w1.shape[2], a13.shape[2]
        w_N1 = w_N.to(x.dtype).reshape(-1, 1)
        a_NH, b_NH = x.new_empty(n_rows, hidden), x.new_empty(n_rows, hidden)
        z1_NR, z2_NR = x.new_empty(n_rows, rank), x.new_empty(n_rows, rank)
        out = x.new_zeros(x.shape[0], w2.shape[2])
        slices = expert_slices(counts)
        for e, lo, hi in slices:
            x_n = x[token_N[lo:hi]]
            z1 = torch.mm(x_n if masks is None else x_n * masks[0][lo:hi], a13[e], out=z1_NR[lo:hi])
            a_n = torch.mm(x_n, w1[e], out=a_NH[lo:hi]).addmm_(z1, b13[e, :, :hidden], alpha=scale)
            b_n = torch.mm(x_n, w3[e], out=b_NH[lo:hi]).addmm_(z1, b13[e, :, hidden:], alpha=scale)
            hw_n = F.silu(a_n).mul_(b_n).mul_(w_N1[lo:hi])
            z2 = torch.mm(hw_n if masks is None else hw_n * masks[1][lo:hi], a2[e], out=z2_NR[lo:hi])
            out.index_add_(0, token_N[lo:hi], torch.mm(hw_n, w2[e]).addmm_(z2, b2[e], alpha=scale))
        ctx.save_for_backward(x, token_N, w_N1, a13, b13, a2, b2, w1, w3, w2, a_NH, b_NH, z1_NR, z2_NR,
                              *(masks or ()))
        ctx.slices, ctx.w_dtype, ctx.scale, ctx.adapter = slices, w_N.dtype, scale, adapter
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x, token_N, w_N1, a13, b13, a2, b2, w1, w3, w2, a_NH, b_NH, z1_NR, z2_NR, *masks = ctx.saved_tensors
        s, hidden, cap = ctx.scale, w1.shape[2], _active_capture()
        g = g.contiguous()
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dw_N1 = torch.empty_like(w_N1) if ctx.needs_input_grad[2] else None
        da13, db13, da2, db2 = (torch.zeros_like(t) for t in (a13, b13, a2, b2))  # experts without rows stay 0
        for e, lo, hi in ctx.slices:
            tok = token_N[lo:hi]
            x_n, g_n = x[tok], g[tok]
            a_n, b_n, w_n1, z1, z2 = a_NH[lo:hi], b_NH[lo:hi], w_N1[lo:hi], z1_NR[lo:hi], z2_NR[lo:hi]
            silu_n = F.silu(a_n)
            h_n = silu_n * b_n  # unweighted hidden activation
            hw_n = h_n * w_n1 if not masks else h_n * w_n1 * masks[1][lo:hi]  # the down adapter's input
            gz2 = g_n @ b2[e].t()  # (n, r)
            dhw_n = torch.mm(g_n, w2[e].t())  # gradient w.r.t. the weighted hidden activation
            if masks:  # the low-rank branch's input gradient passes its dropout mask
                dhw_n.add_(torch.mm(gz2, a2[e].t()).mul_(masks[1][lo:hi]), alpha=s)
            else:
                dhw_n.addmm_(gz2, a2[e].t(), alpha=s)
            da2[e].addmm_(hw_n.t(), gz2, alpha=s)
            db2[e].addmm_(z2.t(), g_n, alpha=s)
            if dw_N1 is not None:
                torch.sum(dhw_n * h_n, dim=-1, keepdim=True, out=dw_N1[lo:hi])
            dh_n = dhw_n.mul_(w_n1)
            db_n = silu_n.mul_(dh_n)
            da_n = torch.ops.aten.silu_backward(dh_n.mul_(b_n), a_n)
            db13[e, :, :hidden].addmm_(z1.t(), da_n, alpha=s)
            db13[e, :, hidden:].addmm_(z1.t(), db_n, alpha=s)
            gz1 = torch.mm(da_n, b13[e, :, :hidden].t()).addmm_(db_n, b13[e, :, hidden:].t())  # (n, r)
            xm_n = x_n if not masks else x_n * masks[0][lo:hi]  # the gate/up adapter's input
            da13[e].addmm_(xm_n.t(), gz1, alpha=s)
            if cap is not None:
                ex = tok // cap.tokens_per_example
                a = ctx.adapter
                SampleSink(cap, a.A13, a.B13, e, ex).write(xm_n, z1, torch.cat((da_n, db_n), 1), gz1, s)
                SampleSink(cap, a.A2, a.B2, e, ex).write(hw_n, z2, g_n, gz2, s)
            if dx is not None:
                dx_n = torch.mm(da_n, w1[e].t()).addmm_(db_n, w3[e].t())
                if masks:
                    dx_n.add_(torch.mm(gz1, a13[e].t()).mul_(masks[0][lo:hi]), alpha=s)
                else:
                    dx_n.addmm_(gz1, a13[e].t(), alpha=s)
                dx.index_add_(0, tok, dx_n)
        dw_N = None if dw_N1 is None else dw_N1.reshape(-1).to(ctx.w_dtype)
        return dx, None, dw_N, da13, db13, da2, db2, None, None, None, None, None, None, None


Adapter = LinearAdapter | ExpertAdapter


def _linear_targets(model: MoETransformer, targets: list[str]) -> Iterator[tuple[str, nn.Linear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, Attention) and "attn" in targets:
            yield from ((f"{name}.{p}", getattr(mod, p)) for p in ("wq", "wk", "wv", "wo"))
        elif isinstance(mod, SwiGLU):
            shared = name.endswith(".shared")
            if ("shared_ffn" if shared else "dense_ffn") in targets:
                yield from ((f"{name}.{p}", getattr(mod, p)) for p in ("w1", "w3", "w2"))


def apply_lora(model: MoETransformer, cfg: LoRAConfig, seed: int = 0) -> dict[str, Adapter]:
    """Attach adapters (each as child `lora` of its target) and freeze the base; returns them by the
    target's name. Call after parallelism sharded the experts and after the base weights are set."""
    cfg.validate()
    if adapters_of(model):
        raise ValueError("this model already carries LoRA adapters; remove_lora(model) first.")
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, Adapter] = {}
    for name, lin in _linear_targets(model, cfg.targets):
        lin.lora = out[name] = LinearAdapter(lin, cfg, name, seed)
    for name, moe in model.moe_layers().items():
        if "experts" in cfg.targets:
            key = f"layers.{name}.ffn.experts"
            moe.experts.lora = out[key] = ExpertAdapter(moe.experts, cfg, key, seed)
        if cfg.train_router:
            moe.router.gate.weight.requires_grad_(True)
    if cfg.train_embeddings:
        for mod in (model.tok_emb, model.head):
            if mod is not None:
                mod.weight.requires_grad_(True)
    return out


def adapters_of(model: nn.Module) -> dict[str, Adapter]:
    """The adapters attached to `model`, by the name of the module they adapt."""
    return {name[:-len(".lora")]: m for name, m in model.named_modules() if isinstance(m, LinearAdapter | ExpertAdapter)}


def _base_weights(model: nn.Module, name: str, adapter: Adapter) -> list[torch.Tensor]:
    mod = model.get_submodule(name)
    return [mod.weight] if isinstance(adapter, LinearAdapter) else [mod.w1, mod.w3, mod.w2]


def _deltas(adapter: Adapter) -> list[torch.Tensor]:
    return [adapter.delta()] if isinstance(adapter, LinearAdapter) else list(adapter.deltas())


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W += scale * (adapter product) for every adapter; the originals are kept, so `unmerge_lora`
    restores them bit for bit. The adapted model's outputs are then computed from W alone."""
    for name, adapter in adapters_of(model).items():
        if adapter.merged:
            continue
        weights = _base_weights(model, name, adapter)
        adapter.original = tuple(w.detach().clone() for w in weights)
        for w, dw in zip(weights, _deltas(adapter), strict=True):
            w.add_(dw.to(w.dtype))
        adapter.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora` exactly (the kept original weights are copied back)."""
    for name, adapter in adapters_of(model).items():
        if not adapter.merged:
            continue
        for w, orig in zip(_base_weights(model, name, adapter), adapter.original, strict=True):
            w.copy_(orig)
        adapter.original, adapter.merged = None, False


def remove_lora(model: nn.Module, merge: bool) -> None:
    """Take every adapter off (after merging it into the base weights when `merge`), unfreeze nothing."""
    if merge:
        merge_lora(model)
    for name, adapter in adapters_of(model).items():
        mod = model.get_submodule(name)
        if isinstance(adapter, LinearAdapter):
            del mod.forward  # back to the class's method
        else:
            del mod.local_gather_combine  # back to the class's method
        adapter.original = None
        del mod.lora


# ---- counting and state ---------------------------------------------------------------------------
def lora_param_counts(model: MoETransformer, cfg: LoRAConfig) -> tuple[int, int]:
    """(trainable, total) parameters of the whole unsharded model with `cfg`'s adapters, counted from
    shapes (works on the meta device): adapters plus what `train_router` / `train_embeddings` unfreeze."""
    mc, r = model.cfg, cfg.rank
    base = sum(p.numel() for p in model.parameters())
    trainable = 0
    for _, lin in _linear_targets(model, cfg.targets):
        trainable += r * (lin.in_features + lin.out_features)
    m = mc.moe
    if "experts" in cfg.targets:
        per_expert = r * (mc.d_model + 2 * m.expert_hidden) + r * (m.expert_hidden + mc.d_model)
        trainable += per_expert * m.n_routed_experts * mc.n_moe_layers
    total = base + trainable
    if cfg.train_router:
        trainable += mc.n_moe_layers * m.n_routed_experts * mc.d_model
    if cfg.train_embeddings:
        trainable += 2 * mc.vocab_size * mc.d_model
    return trainable, total


def trainable_fraction_line(model: MoETransformer, cfg: LoRAConfig) -> tuple[float, str]:
    """The trainable fraction and the line the fine-tune prints."""
    trainable, total = lora_param_counts(model, cfg)
    frac = trainable / total
    return frac, (f"LoRA rank {cfg.rank} on {'+'.join(cfg.targets)}: {trainable:,} trainable of {total:,} "
                  f"parameters ({100 * frac:.3f}%)")


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable parameter by its name in the model (adapters and anything unfrozen)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def expert_adapter_offsets(model: nn.Module) -> dict[str, int]:
    """Name of each expert adapter parameter -> global id of its first local expert."""
    return {f"{name}.lora.{p}": model.get_submodule(name).shard.first
            for name, a in adapters_of(model).items() if isinstance(a, ExpertAdapter)
            for p in ("A13", "B13", "A2", "B2")}



def shard_adapter_gradients(plan: Any) -> None:
    """Tell a `moe.parallel.apply.ParallelPlan` that the expert adapters are sharded like their experts,
    so their gradients are averaged over the ranks holding the same experts (and clipping sums their
    squares over the EP group), not over every rank. Call after `apply_lora`."""
    plan.expert_param_names |= set(expert_adapter_offsets(plan.model))
