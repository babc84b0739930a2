"""Routed experts as 3-D weights (experts x in x out) computed over tokens sorted by expert.

`GroupedExperts.forward(x_ND, counts_E)` is the one method the MoE layer (and expert parallelism)
calls. Behind it sit two kernels: one GEMM per expert over its contiguous slice, or
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

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND holds tokens sorted by expert; counts_E[e] rows belong to expert e, in order."""
        if x_ND.shape[0] and self.resolve_kernel(x_ND) == "grouped_mm":
            return self._grouped_mm(x_ND, counts_E)
        return self._per_expert_gemm(x_ND, counts_E)

    def resolve_kernel(self, x_ND: torch.Tensor) -> str:
        if self.kernel == "loop" or not _grouped_mm_supported(x_ND, self.d_model, self.hidden):
            return "loop"
        if self.kernel == "grouped_mm":
            return "grouped_mm"
        key = (x_ND.device.type, x_ND.dtype, self.n_experts, self.d_model, self.hidden)
        if key not in _KERNEL_CHOICE:
            _KERNEL_CHOICE[key] = self._measure_kernels(x_ND)
        return _KERNEL_CHOICE[key]

    def _per_expert_gemm(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        outs = []
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n == 0:
                continue
            x_nD = x_ND[start:start + n]
            h_nH = F.silu(x_nD @ self.w1[e]) * (x_nD @ self.w3[e])
            outs.append(h_nH @ self.w2[e])
            start += n
        if not outs:
            # keep the graph connected to the input and the weights (expert parallelism's backward
            # all-to-all must run on every rank, also one whose experts received no tokens)
            return x_ND.new_zeros(0, self.d_model) + 0 * (x_ND.sum() + self.w2.sum())
        return torch.cat(outs, dim=0)

    def _grouped_mm(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts_E, dim=0).to(device=x_ND.device, dtype=torch.int32)
        h_NH = F.silu(torch._grouped_mm(x_ND, self.w1, offs=offs)) * torch._grouped_mm(x_ND, self.w3, offs=offs)
        return _ContiguousGrad.apply(torch._grouped_mm(h_NH, self.w2, offs=offs))

    @torch.no_grad()
    def _measure_kernels(self, x_like: torch.Tensor, n_tokens: int = 2048, repeats: int = 3) -> str:
        """Time forward+backward of both kernels on an evenly routed synthetic batch; return the faster."""
        counts = torch.full((self.n_experts,), max(1, n_tokens // self.n_experts), device=x_like.device)
        x = torch.randn(int(counts.sum()), self.d_model, device=x_like.device, dtype=x_like.dtype)
        best, best_t = "loop", float("inf")
        for name, fn in (("loop", self._per_expert_gemm), ("grouped_mm", self._grouped_mm)):
            try:
                elapsed = []
                for _ in range(repeats + 1):
                    with torch.enable_grad():
                        xi = x.clone().requires_grad_(True)
                        if x_like.device.type == "cuda":
                            torch.cuda.synchronize(x_like.device)
                        t0 = time.perf_counter()
                        out = fn(xi, counts)
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


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm requires it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad.contiguous()
