"""Routed experts as 3-D weights (experts x in x out) computed over tokens sorted by expert.

`GroupedExperts.forward(x_ND, counts_E, weight_N)` is the one method the MoE layer (and expert
parallelism) calls; it returns weight_N[n] * expert(x_ND[n]) with the combine weight applied to
the hidden activation before the (linear) down projection, which is exact and saves an (N, D)
pass. Behind it sit two kernels: one GEMM per expert over its contiguous slice, or
`torch._grouped_mm` over all experts at once. `expert_kernel="auto"` measures both once per
(device, dtype, shape) and keeps the faster; the grouped kernel is only eligible where its
alignment rules hold. `reference_forward` is a plain masked loop kept for tests.
"""

from __future__ import annotations

import time

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


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, hidden: int, kernel: str = "auto") -> None:
        super().__init__()
        self.n_experts, self.d_model, self.hidden, self.kernel = n_experts, d_model, hidden, kernel
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # gate projection
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # up projection
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # down projection

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1, std=std)
        nn.init.trunc_normal_(self.w3, std=std)
        nn.init.trunc_normal_(self.w2, std=out_std)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x_ND holds tokens sorted by expert; counts_E[e] rows belong to expert e, in order.

        With weight_N (N,) each output row is scaled by its combine weight (gradient flows to it).
        """
        if weight_N is None:
            weight_N = x_ND.new_ones(x_ND.shape[0])
        if x_ND.shape[0] and self.resolve_kernel(x_ND) == "grouped_mm":
            return self._grouped_mm(x_ND, counts_E, weight_N)
        return self._per_expert_gemm(x_ND, counts_E, weight_N)

    def resolve_kernel(self, x_ND: torch.Tensor) -> str:
        if self.kernel == "loop" or not _grouped_mm_supported(x_ND, self.d_model, self.hidden):
            return "loop"
        if self.kernel == "grouped_mm":
            return "grouped_mm"
        key = (x_ND.device.type, x_ND.dtype, self.n_experts, self.d_model, self.hidden)
        if key not in _KERNEL_CHOICE:
            _KERNEL_CHOICE[key] = self._measure_kernels(x_ND)
        return _KERNEL_CHOICE[key]

    def _per_expert_gemm(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N: torch.Tensor
                         ) -> torch.Tensor:
        return _PerExpertSwiGLU.apply(x_ND, weight_N, self.w1, self.w3, self.w2, counts_E.tolist())

    def _grouped_mm(self, x_ND: torch.Tensor, counts_E: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts_E, dim=0).to(device=x_ND.device, dtype=torch.int32)
        h_NH = F.silu(torch._grouped_mm(x_ND, self.w1, offs=offs)) * torch._grouped_mm(x_ND, self.w3, offs=offs)
        h_NH = h_NH * weight_N.unsqueeze(-1).to(h_NH.dtype)
        return _ContiguousGrad.apply(torch._grouped_mm(h_NH, self.w2, offs=offs))

    @torch.no_grad()
    def _measure_kernels(self, x_like: torch.Tensor, n_tokens: int = 2048, repeats: int = 3) -> str:
        """Time forward+backward of both kernels on an evenly routed synthetic batch; return the faster."""
        counts = torch.full((self.n_experts,), max(1, n_tokens // self.n_experts), device=x_like.device)
        x = torch.randn(int(counts.sum()), self.d_model, device=x_like.device, dtype=x_like.dtype)
        best, best_t = "loop", float("inf")
        w = torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
        for name, fn in (("loop", self._per_expert_gemm), ("grouped_mm", self._grouped_mm)):
            try:
                elapsed = []
                for _ in range(repeats + 1):
                    with torch.enable_grad():
                        xi = x.clone().requires_grad_(True)
                        if x_like.device.type == "cuda":
                            torch.cuda.synchronize(x_like.device)
                        t0 = time.perf_counter()
                        out = fn(xi, counts, w)
                        torch.autograd.grad(out.sum(), [xi, self.w1, self.w3, self.w2])
                        if x_like.device.type == "cuda":
                            torch.cuda.synchronize(x_like.device)
                        elapsed.append(time.perf_counter() - t0)
                t = sorted(elapsed[1:])[len(elapsed[1:]) // 2]
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
    """out[n] = w[n] * (silu(x[n] W1[e]) * (x[n] W3[e])) W2[e]: one GEMM per expert over its contiguous
    slice, with a hand-written backward.

    Autograd through `w1[e]` slices would materialize a zero-filled (E, ...) gradient per expert and
    sum them (quadratic in E); here each expert's weight gradient is written into its own slice,
    GEMMs write into preallocated buffers, and the elementwise work runs once over all rows.
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_N: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,  # noqa: D102
                w2: torch.Tensor, counts: list[int]) -> torch.Tensor:
        n_rows, hidden, d_out = x_ND.shape[0], w1.shape[2], w2.shape[2]
        x_ND = x_ND.contiguous()
        w_N1 = w_N.to(x_ND.dtype).reshape(-1, 1)
        a_NH, b_NH = x_ND.new_empty(n_rows, hidden), x_ND.new_empty(n_rows, hidden)
        slices = _expert_slices(counts)
        for e, lo, hi in slices:
            torch.mm(x_ND[lo:hi], w1[e], out=a_NH[lo:hi])
            torch.mm(x_ND[lo:hi], w3[e], out=b_NH[lo:hi])
        hw_NH = F.silu(a_NH).mul_(b_NH).mul_(w_N1)
        out_ND = x_ND.new_empty(n_rows, d_out)
        for e, lo, hi in slices:
            torch.mm(hw_NH[lo:hi], w2[e], out=out_ND[lo:hi])
        ctx.save_for_backward(x_ND, w_N1, w1, w3, w2, a_NH, b_NH)
        ctx.slices, ctx.w_dtype = slices, w_N.dtype
        return out_ND

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x_ND, w_N1, w1, w3, w2, a_NH, b_NH = ctx.saved_tensors
        slices = ctx.slices
        g_ND = g_ND.contiguous()
        sig_NH = torch.sigmoid(a_NH)
        silu_NH = a_NH * sig_NH
        h_NH = silu_NH * b_NH  # unweighted hidden activation
        dhw_NH = torch.empty_like(a_NH)  # gradient w.r.t. the weighted hidden activation
        dw2 = _empty_grad_like(w2, slices)
        hw_NH = h_NH * w_N1
        for e, lo, hi in slices:
            torch.mm(g_ND[lo:hi], w2[e].t(), out=dhw_NH[lo:hi])
            torch.mm(hw_NH[lo:hi].t(), g_ND[lo:hi], out=dw2[e])
        del hw_NH
        dw_N = (dhw_NH * h_NH).sum(-1).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        del h_NH
        dh_NH = dhw_NH.mul_(w_N1)
        db_NH = dh_NH * silu_NH
        # d silu(a) / da = sig + silu * (1 - sig)
        da_NH = dh_NH.mul_(b_NH).mul_(silu_NH.mul_(1 - sig_NH).add_(sig_NH))
        dw1, dw3 = _empty_grad_like(w1, slices), _empty_grad_like(w3, slices)
        dx_ND = torch.empty_like(x_ND) if ctx.needs_input_grad[0] else None
        for e, lo, hi in slices:
            torch.mm(x_ND[lo:hi].t(), da_NH[lo:hi], out=dw1[e])
            torch.mm(x_ND[lo:hi].t(), db_NH[lo:hi], out=dw3[e])
            if dx_ND is not None:
                torch.mm(da_NH[lo:hi], w1[e].t(), out=dx_ND[lo:hi])
                dx_ND[lo:hi].addmm_(db_NH[lo:hi], w3[e].t())
        return dx_ND, dw_N, dw1, dw3, dw2, None


def _empty_grad_like(w: torch.Tensor, slices: list[tuple[int, int, int]]) -> torch.Tensor:
    """Gradient buffer for (E, ...) weights: experts without rows are zero, the others are written by GEMMs."""
    grad = torch.empty_like(w)
    used = {e for e, _, _ in slices}
    for e in range(w.shape[0]):
        if e not in used:
            grad[e].zero_()
    return grad


def _expert_slices(counts: list[int]) -> list[tuple[int, int, int]]:
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
