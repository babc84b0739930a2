"""Routed experts as 3-D weights (experts x in x out) computed over tokens sorted by expert.

`GroupedExperts.forward(x_ND, counts_E, weight_N)` returns weight_N[n] * expert(x_ND[n]) for rows
sorted by expert, with the combine weight applied to the hidden activation before the (linear)
down projection, which is exact and saves an (N, D) pass. `gather_combine(x_TD, token_N, counts_E,
weight_N)`, which the MoE layer calls, adds the gather of the token rows and their weighted
scatter-add, fused into the per-expert kernel (no (N, D) copies); expert parallelism replaces it
through the `dispatch` seam and runs `local_gather_combine` on the ranks holding the experts.
Behind it sit two kernels: one GEMM per expert over its contiguous slice, or `torch._grouped_mm`
over all experts at once. `expert_kernel="auto"` takes the per-expert kernel
on CPU when gradients are on (it fuses the gather, scatter and in-place gradients; in the layer
benchmark the grouped kernel was 13% slower at 8 experts, while a synthetic micro-measurement could
not tell them apart reliably) and the grouped kernel for inference (serving's decode steps route a
few rows to each expert, where per-expert calls cost more than the work; its per-group GEMMs give
the per-expert kernel's results bit for bit on CPU) and on GPUs measures both once per (device, dtype, shape) and keeps the faster; the
grouped kernel is only eligible where its alignment rules hold. `reference_forward` is a plain
masked loop kept for tests.

In-place gradient accumulation (`accumulate_grad_in_place`, set by the trainer and the benchmark,
which then keep gradients allocated with `zero_grad(set_to_none=False)`): the per-expert kernel
adds each expert's weight gradient straight into the existing `.grad` (one GEMM with beta=1)
instead of returning a fresh (E, D, H) tensor for autograd to store or add. A 64-expert layer's
weight gradients are hundreds of MiB; allocating them anew every step costs page faults and
zeroing (on CPU, glibc maps and unmaps such blocks per allocation) that grow with the expert count.
While it is on and `.grad` exists, `torch.autograd.grad` with respect to the expert weights sees
no contribution from this kernel, as with Megatron's gradient-accumulation fusion.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_KERNEL_CHOICE: dict[tuple, str] = {}  # measured choice per (device type, dtype, E, D, H)


def _grouped_mm_supported(x: torch.Tensor, d_model: int, hidden: int) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // x.element_size()
    if d_model % align or hidden % align:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu"


@dataclass(frozen=True)
class ExpertShard:
    """Which experts of a layer's global set a `GroupedExperts` holds: ids [first, first + count) of
    `total`. Expert parallelism declares it (moe/parallel/expert.py); initialization and checkpoints
    read it, so no code guesses placement from names."""

    first: int
    count: int
    total: int

    @property
    def is_full(self) -> bool:
        return self.count == self.total


class GroupedExperts(nn.Module):
    PARAM_NAMES = ("w1", "w2", "w3")  # the (experts x ...) weights, sharded along dim 0 by expert parallelism

    def __init__(self, n_experts: int, d_model: int, hidden: int, kernel: str = "auto") -> None:
        super().__init__()
        self.n_experts, self.d_model, self.hidden, self.kernel = n_experts, d_model, hidden, kernel
        self.shard = ExpertShard(first=0, count=n_experts, total=n_experts)
        self.accumulate_grad_in_place = False
        self.dispatch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # gate projection
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # up projection
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # down projection

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Same values as the one-device layer for the same random state: a shard draws the whole
        (total, ...) weight, one at a time, and keeps its slice (transient memory: one full weight)."""
        for w, w_std in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            if self.shard.is_full:
                nn.init.trunc_normal_(w, std=w_std)
                continue
            full = torch.empty((self.shard.total, *w.shape[1:]), device=w.device, dtype=w.dtype)
            nn.init.trunc_normal_(full, std=w_std)
            w.copy_(full[self.shard.first:self.shard.first + self.shard.count])
            del full

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x_ND holds tokens sorted by expert; counts_E[e] rows belong to expert e, in order.

        With weight_N (N,) each output row is scaled by its combine weight (gradient flows to it).
        """
        if weight_N is None:
            weight_N = x_ND.new_ones(x_ND.shape[0])
        if x_ND.shape[0] and self.resolve_kernel(x_ND) == "grouped_mm":
            return self._grouped_mm(x_ND, counts_E, weight_N)
        return _PerExpertSwiGLU.apply(x_ND, None, weight_N, self.w1, self.w3, self.w2, counts_E.tolist(),
                                      self.accumulate_grad_in_place)

    def gather_combine(self, x_TD: torch.Tensor, token_N: torch.Tensor, counts_E: torch.Tensor,
                       weight_N: torch.Tensor) -> torch.Tensor:
        """y_TD[t] = sum of weight_N[n] * expert_n(x_TD[t]) over the rows n with token_N[n] == t.

        Rows are sorted by expert (counts_E). Expert parallelism installs `dispatch`, which moves
        the tokens to the ranks holding their experts and calls `local_gather_combine` there.
        """
        if self.dispatch is not None:
            return self.dispatch(x_TD, token_N, counts_E, weight_N)
        return self.local_gather_combine(x_TD, token_N, counts_E, weight_N)

    def local_gather_combine(self, x_TD: torch.Tensor, token_N: torch.Tensor, counts_E: torch.Tensor,
                             weight_N: torch.Tensor) -> torch.Tensor:
        """`gather_combine` over this module's own experts: with the per-expert kernel the gather and
        the scatter-add happen inside it, per expert (no (N, D) copies); otherwise through `forward`."""
        if x_TD.shape[0] and self.resolve_kernel(x_TD) == "loop":
            return _PerExpertSwiGLU.apply(x_TD, token_N, weight_N, self.w1, self.w3, self.w2, counts_E.tolist(),
                                          self.accumulate_grad_in_place)
        return torch.zeros_like(x_TD).index_add(0, token_N, self(x_TD[token_N], counts_E, weight_N))

    def resolve_kernel(self, x_ND: torch.Tensor) -> str:
        if self.kernel == "loop" or not _grouped_mm_supported(x_ND, self.d_model, self.hidden):
            return "loop"
        if self.kernel == "grouped_mm":
            return "grouped_mm"
        if x_ND.device.type == "cpu":  # training: the fused per-expert kernel; inference: fewer, larger calls
            return "loop" if torch.is_grad_enabled() else "grouped_mm"
        key = (x_ND.device.type, x_ND.dtype, self.n_experts, self.d_model, self.hidden)
        if key not in _KERNEL_CHOICE:
            _KERNEL_CHOICE[key] = self._measure_kernels(x_ND)
        return _KERNEL_CHOICE[key]

    def _grouped_mm(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts_E, dim=0).to(device=x_ND.device, dtype=torch.int32)
        h_NH = F.silu(torch._grouped_mm(x_ND, self.w1, offs=offs)) * torch._grouped_mm(x_ND, self.w3, offs=offs)
        h_NH = h_NH * weight_N.unsqueeze(-1).to(h_NH.dtype)
        return _ContiguousGrad.apply(torch._grouped_mm(h_NH, self.w2, offs=offs))

    @torch.no_grad()
    def _measure_kernels(self, x_like: torch.Tensor, repeats: int = 5) -> str:
        """Time forward+backward of both kernels as the MoE layer runs them (`gather_combine`: gather,
        experts, weighted scatter-add) on an evenly routed synthetic batch; return the faster.

        The batch has training-sized expert slices (>= 192 rows each): with few rows per expert the
        weight-gradient writes dominate and hide the kernels' difference.
        """
        dev, dtype = x_like.device, x_like.dtype
        n_rows = max(8192, 192 * self.n_experts)
        counts = torch.full((self.n_experts,), max(1, n_rows // self.n_experts), device=dev)
        n = int(counts.sum())
        x_TD = torch.randn(max(1, n // 4), self.d_model, device=dev, dtype=dtype)
        token_N = torch.randint(0, x_TD.shape[0], (n,), device=dev)
        w_N = torch.rand(n, device=dev, dtype=dtype)
        kernels = {
            "loop": lambda x: _PerExpertSwiGLU.apply(x, token_N, w_N, self.w1, self.w3, self.w2, counts.tolist()),
            "grouped_mm": lambda x: torch.zeros_like(x).index_add(0, token_N, self._grouped_mm(x[token_N], counts, w_N)),
        }
        # on CPU count this process's CPU time: other processes' load must not decide the kernel
        clock = time.process_time if dev.type == "cpu" else time.perf_counter
        best, best_t = "loop", float("inf")
        for name, fn in kernels.items():
            try:
                elapsed = []
                for _ in range(repeats + 1):
                    with torch.enable_grad():
                        xi = x_TD.clone().requires_grad_(True)
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        t0 = clock()
                        out = fn(xi)
                        torch.autograd.grad(out.sum(), [xi, self.w1, self.w3, self.w2])
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        elapsed.append(clock() - t0)
                t = min(elapsed[1:])  # the least disturbed run: noise only ever adds time
            except RuntimeError:
                continue
            if t < best_t:
                best, best_t = name, t
        return best

    def reference_forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor
                          ) -> torch.Tensor:
        """Plain per-expert masked loop (as in common MoE code); the correctness reference for tests."""
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.n_experts):
            token_idx, slot = torch.where(topk_idx_TK == e)
            if token_idx.numel() == 0:
                continue
            x_nD = x_TD[token_idx]
            h = F.silu(x_nD @ self.w1[e]) * (x_nD @ self.w3[e])
            y_TD = y_TD.index_add(0, token_idx, (h @ self.w2[e]) * topk_weight_TK[token_idx, slot, None])
        return y_TD


class _PerExpertSwiGLU(torch.autograd.Function):
    """Weighted SwiGLU experts, one GEMM per expert over its contiguous slice, hand-written backward.

    Row n (sorted by expert) computes w[n] * (silu(x[n] W1[e]) * (x[n] W3[e])) W2[e].
    Sorted mode (token_N None): x_ND holds the rows, the output is (N, D) in the same order.
    Gather-scatter mode: x_TD holds the tokens, row n reads token_N[n] and its output is added to
    that token of the (T, D) output, so no (N, D) gathered copy exists in forward or backward.

    All elementwise work runs per expert on L2-sized temporaries right after its GEMM; only the
    two pre-activations (N, H) are kept for backward. Each expert's weight gradient is written into
    its own slice (autograd through `w1[e]` would build a zero-filled (E, ...) tensor per expert),
    or, with `accumulate` and an existing `.grad`, added into that slice in place (module docstring).
    Frozen weights (a LoRA run whose adapters leave the routed experts out) get no weight gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_N: torch.Tensor | None, w_N: torch.Tensor,  # noqa: D102
                w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, counts: list[int],
                accumulate: bool = False) -> torch.Tensor:
        x = x.contiguous()
        n_rows, hidden, d_out = sum(counts), w1.shape[2], w2.shape[2]
        w_N1 = w_N.to(x.dtype).reshape(-1, 1)
        a_NH, b_NH = x.new_empty(n_rows, hidden), x.new_empty(n_rows, hidden)
        out = x.new_empty(n_rows, d_out) if token_N is None else x.new_zeros(x.shape[0], d_out)
        slices = expert_slices(counts)
        for e, lo, hi in slices:
            x_n = x[lo:hi] if token_N is None else x[token_N[lo:hi]]
            a_n, b_n = a_NH[lo:hi], b_NH[lo:hi]
            torch.mm(x_n, w1[e], out=a_n)
            torch.mm(x_n, w3[e], out=b_n)
            hw_n = F.silu(a_n).mul_(b_n).mul_(w_N1[lo:hi])
            if token_N is None:
                torch.mm(hw_n, w2[e], out=out[lo:hi])
            else:
                out.index_add_(0, token_N[lo:hi], hw_n @ w2[e])
        ctx.save_for_backward(x, token_N, w_N1, w1, w3, w2, a_NH, b_NH)
        ctx.slices, ctx.w_dtype = slices, w_N.dtype
        ctx.params = (w1, w3, w2) if accumulate else None
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x, token_N, w_N1, w1, w3, w2, a_NH, b_NH = ctx.saved_tensors
        slices = ctx.slices
        g = g.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_dw = any(ctx.needs_input_grad[3:6])  # frozen experts (LoRA on other targets): input gradients only
        dx = None
        if need_x:
            dx = torch.empty_like(x) if token_N is None else torch.zeros_like(x)  # slices cover all N rows
        dw_N1 = torch.empty_like(w_N1) if need_w else None
        in_place = need_dw and ctx.params is not None and all(w.grad is not None for w in ctx.params)
        if in_place:
            dw1, dw3, dw2 = (w.grad for w in ctx.params)
        elif need_dw:
            dw1, dw3, dw2 = (_empty_grad_like(w, slices) for w in (w1, w3, w2))
        else:
            dw1 = dw3 = dw2 = None
        for e, lo, hi in slices:
            tok = None if token_N is None else token_N[lo:hi]
            x_n = x[lo:hi] if tok is None else x[tok]
            g_n = g[lo:hi] if tok is None else g[tok]
            a_n, b_n, w_n1 = a_NH[lo:hi], b_NH[lo:hi], w_N1[lo:hi]
            silu_n = F.silu(a_n)
            h_n = silu_n * b_n  # unweighted hidden activation
            dhw_n = g_n @ w2[e].t()  # gradient w.r.t. the weighted hidden activation
            if dw2 is not None:
                _mm_into(dw2[e], (h_n * w_n1).t(), g_n, in_place)
            if dw_N1 is not None:
                torch.sum(dhw_n * h_n, dim=-1, keepdim=True, out=dw_N1[lo:hi])
            dh_n = dhw_n.mul_(w_n1)
            db_n = silu_n.mul_(dh_n)
            da_n = torch.ops.aten.silu_backward(dh_n.mul_(b_n), a_n)
            if dw1 is not None:
                _mm_into(dw1[e], x_n.t(), da_n, in_place)
                _mm_into(dw3[e], x_n.t(), db_n, in_place)
            if dx is not None:
                if tok is None:
                    torch.mm(da_n, w1[e].t(), out=dx[lo:hi])
                    dx[lo:hi].addmm_(db_n, w3[e].t())
                else:
                    dx.index_add_(0, tok, torch.addmm(da_n @ w1[e].t(), db_n, w3[e].t()))
        dw_N = None if dw_N1 is None else dw_N1.reshape(-1).to(ctx.w_dtype)
        if in_place:
            return dx, None, dw_N, None, None, None, None, None
        return dx, None, dw_N, dw1, dw3, dw2, None, None


def swiglu_experts(x_TD: torch.Tensor, token_N: torch.Tensor | None, counts_E: torch.Tensor, weight_N: torch.Tensor,
                   w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The per-expert kernel on given (experts x in x out) weights: what `local_gather_combine` computes
    with the module's own (moe/quant.py runs it on dequantized weights, so both paths agree bit for bit)."""
    return _PerExpertSwiGLU.apply(x_TD, token_N, weight_N, w1, w3, w2, counts_E.tolist(), False)


def accumulate_expert_grads_in_place(model: nn.Module) -> None:
    """Turns on in-place gradient accumulation for every `GroupedExperts` in `model` (module docstring);
    the caller then clears gradients with `zero_grad(set_to_none=False)`."""
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.accumulate_grad_in_place = True


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add: bool) -> None:
    """dst = a @ b, or dst += a @ b (one GEMM either way)."""
    if add:
        dst.addmm_(a, b)
    else:
        torch.mm(a, b, out=dst)


def _empty_grad_like(w: torch.Tensor, slices: list[tuple[int, int, int]]) -> torch.Tensor:
    """Gradient buffer for (E, ...) weights: experts without rows are zero, the others are written by GEMMs."""
    grad = torch.empty_like(w)
    used = {e for e, _, _ in slices}
    for e in range(w.shape[0]):
        if e not in used:
            grad[e].zero_()
    return grad


def expert_slices(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that received rows."""
    slices, start = [], 0
    for e, n in enumerate(counts):
        if n:
            slices.append((e, start, start + n))
            start += n
    return slices


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm requires it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad.contiguous()
