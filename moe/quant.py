"""Quantized weights for serving: int8 and fp8 (e4m3), applied to a built model from outside and
removable exactly (`quantize_model`, `dequantize_model`), like the parallel styles.

- int8: weight-only, symmetric, one scale per output channel (per expert and output channel for the
  3-D expert weights): q = round(w / s), s = max|w| / 127 over the input dimension.
- fp8: e4m3 with one scale per weight matrix (per expert for the expert weights) or one per 128x128
  block (`fp8_block=128`), s = max|w| / 448 over the matrix or block; values are clamped to
  e4m3's range [-448, 448] before the cast (a cast does not saturate).

What is quantized: the attention projections, the dense feed-forward, the shared experts and the
routed experts. The embedding, the norms, the router (its gate and expert bias) and the head stay
in full precision. Quantized weights are stored (out x in), the layout the kernels and vLLM read.

Kernels (`kernel`, chosen per device by `auto`, or forced):
- `int8_mm`: `torch._weight_int8pack_mm` (activations stay in full precision), where it runs on the
  device (probed once) and, on CPU, for bf16/fp16 activations only (with fp32 activations the CPU
  kernel was 10-40x slower than dequantizing and an fp32 GEMM; `auto` then dequantizes),
- `scaled_mm`: `torch._scaled_mm` on fp8 activations (a dynamic per-tensor scale) and fp8 weights
  with their scale; `auto` picks it on CUDA devices of compute capability >= 8.9 for per-matrix scales,
- `dequant`: the weight dequantized (q * s) and the full-precision kernel; the reference the others
  are tested against, and the fp8 path on CPU. Experts then run the same per-expert kernel as
  `GroupedExperts` (`moe.experts.swiglu_experts`), so a dequantizing model equals, bit for bit, the
  full-precision model `dequantize_model` returns.

`export_vllm_fp8` writes an fp8 model in the layout vLLM reads for MoE fp8 checkpoints: the stock
transformers names (moe/hf.py) with each expert's `gate_proj`/`up_proj`/`down_proj` as its own
(out x in) float8_e4m3fn `weight` and its scale (`weight_scale_inv` per 128x128 block, or
`weight_scale` per matrix), and `quantization_config` {quant_method: fp8, activation_scheme:
dynamic, weight_block_size} in config.json.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from moe.config import QuantConfig
from moe.experts import GroupedExperts, expert_slices, swiglu_experts
from moe.layers import SwiGLU
from moe.model import MoETransformer

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
INT8_MAX = 127.0


# ---- quantize / dequantize tensors (..., out, in) ----------------------------------------------
def quantize_tensor(w: torch.Tensor, method: str, fp8_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a weight (..., out, in): int8 scale (..., out); fp8 scale (...) or (..., out/b, in/b)."""
    w = w.detach().float().contiguous()  # (and so are q and its scale)
    if method == "int8":
        scale = w.abs().amax(-1).clamp(min=1e-12) / INT8_MAX
        return (w / scale[..., None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale
    if fp8_block:
        tiles = _tiles(w, fp8_block)  # (..., O/b, b, I/b, b)
        scale = tiles.abs().amax((-3, -1)).clamp(min=1e-12) / FP8_MAX
        q = (w / _expand(scale, fp8_block, w.shape)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q, scale
    scale = w.abs().amax((-2, -1)).clamp(min=1e-12) / FP8_MAX
    return (w / scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor, fp8_block: int = 0) -> torch.Tensor:
    """q * scale in fp32, the inverse layout of `quantize_tensor`."""
    if q.dtype == torch.int8:
        return q.float() * scale[..., None]
    if fp8_block:
        return q.float() * _expand(scale, fp8_block, q.shape)
    return q.float() * scale[..., None, None]


def _tiles(w: torch.Tensor, b: int) -> torch.Tensor:
    *lead, o, i = w.shape
    po, pi = -o % b, -i % b
    w = F.pad(w, (0, pi, 0, po))
    return w.reshape(*lead, (o + po) // b, b, (i + pi) // b, b)


def _expand(scale: torch.Tensor, b: int, shape: torch.Size) -> torch.Tensor:
    """A per-tile scale (..., O/b, I/b) as a per-element one of `shape` (..., O, I)."""
    full = scale.repeat_interleave(b, -2).repeat_interleave(b, -1)
    return full[..., :shape[-2], :shape[-1]]


# ---- matmuls ---------------------------------------------------------------------------------
@functools.cache
def int8_mm_runs(device: str) -> bool:
    """Whether `torch._weight_int8pack_mm` runs on `device` (probed once with a tiny product)."""
    try:
        w = torch.ones(16, 32, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(torch.ones(2, 32, device=device), w, torch.ones(16, device=device))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def resolve_kernel(cfg: QuantConfig, device: torch.device, dims: tuple[int, ...], dtype: torch.dtype) -> str:
    """The kernel a quantized weight on `device` runs with `dtype` activations (the module docstring)."""
    if cfg.kernel != "auto":
        return cfg.kernel
    if cfg.method == "int8":  # on CPU the int8 kernel is made for 16-bit activations (fp32: 10-40x slower)
        fast = device.type != "cpu" or dtype in (torch.bfloat16, torch.float16)
        return "int8_mm" if fast and int8_mm_runs(str(device)) else "dequant"
    cuda_fp8 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if cuda_fp8 and not cfg.fp8_block and all(d % 16 == 0 for d in dims) and hasattr(torch, "_scaled_mm"):
        return "scaled_mm"
    return "dequant"


def quant_matmul(x_NK: torch.Tensor, q_OK: torch.Tensor, scale: torch.Tensor, kernel: str, fp8_block: int = 0
                 ) -> torch.Tensor:
    """x @ dequantize(q, scale).T with `kernel`; (N, K) -> (N, O) in x's dtype."""
    if kernel == "int8_mm":
        return torch._weight_int8pack_mm(x_NK.contiguous(), q_OK, scale.to(x_NK.dtype))
    if kernel == "scaled_mm":
        sx = x_NK.abs().amax().float().clamp(min=1e-12) / FP8_MAX
        xq = (x_NK.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return torch._scaled_mm(xq, q_OK.t(), scale_a=sx, scale_b=scale.float(), out_dtype=x_NK.dtype)
    return F.linear(x_NK, dequantize_tensor(q_OK, scale, fp8_block).to(x_NK.dtype))


class KeepsQuantized(nn.Module):
    """`.to(dtype)` / `.half()` on the model change only where the activations' dtype (`self.dtype`);
    quantized weights and their fp32 scales keep their dtypes (a device move still moves them)."""

    dtype: torch.dtype

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        saved, self._buffers = self._buffers, {}
        super()._apply(fn, recurse)
        probe = fn(torch.zeros((), dtype=self.dtype))
        self.dtype = probe.dtype
        self._buffers = {n: (b if b is None else b.to(probe.device)) for n, b in saved.items()}
        self.kernel = resolve_kernel(self.cfg, probe.device, self.dims, self.dtype)
        return self


class QuantLinear(KeepsQuantized):
    """A bias-free `nn.Linear` with quantized weight `qweight` (out, in) and its `scale`."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig) -> None:
        super().__init__()
        self.cfg, self.in_features, self.out_features = cfg, linear.in_features, linear.out_features
        q, scale = quantize_tensor(linear.weight, cfg.method, cfg.fp8_block)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.dtype, self.dims = linear.weight.dtype, (self.in_features, self.out_features)
        self.kernel = resolve_kernel(cfg, linear.weight.device, self.dims, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x.reshape(-1, self.in_features), self.qweight, self.scale, self.kernel, self.cfg.fp8_block)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device=self.qweight.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(dequantize_tensor(self.qweight, self.scale, self.cfg.fp8_block))
        return lin


class QuantExperts(KeepsQuantized):
    """`GroupedExperts` with quantized weights, for inference: `qw1`, `qw3` (E, hidden, d_model) and
    `qw2` (E, d_model, hidden), each (out x in) per expert, with their scales `s1`, `s3`, `s2`."""

    def __init__(self, experts: GroupedExperts, cfg: QuantConfig) -> None:
        super().__init__()
        self.cfg, self.shard, self.dispatch = cfg, experts.shard, experts.dispatch
        self.n_experts, self.d_model, self.hidden = experts.n_experts, experts.d_model, experts.hidden
        self.dtype, self.kernel_choice = experts.w1.dtype, experts.kernel
        for name in GroupedExperts.PARAM_NAMES:
            q, scale = quantize_tensor(getattr(experts, name).transpose(1, 2), cfg.method, cfg.fp8_block)
            self.register_buffer(f"q{name}", q)
            self.register_buffer(f"s{name[1]}", scale)
        self.dims = (self.d_model, self.hidden)
        self.kernel = resolve_kernel(cfg, experts.w1.device, self.dims, self.dtype)

    def weight(self, name: str) -> torch.Tensor:
        """The dequantized (E, in, out) weight `w1`, `w3` or `w2`, in the layout `GroupedExperts` holds."""
        q, s = getattr(self, f"q{name}"), getattr(self, f"s{name[1]}")
        return dequantize_tensor(q, s, self.cfg.fp8_block).to(self.dtype).transpose(1, 2).contiguous()

    def gather_combine(self, x_TD: torch.Tensor, token_N: torch.Tensor, counts_E: torch.Tensor,
                       weight_N: torch.Tensor) -> torch.Tensor:
        if self.dispatch is not None:
            return self.dispatch(x_TD, token_N, counts_E, weight_N)
        return self.local_gather_combine(x_TD, token_N, counts_E, weight_N)

    def local_gather_combine(self, x_TD: torch.Tensor, token_N: torch.Tensor, counts_E: torch.Tensor,
                             weight_N: torch.Tensor) -> torch.Tensor:
        """y_TD[t] = sum of weight_N[n] * expert_n(x_TD[t]) over rows n of token t (as `GroupedExperts`)."""
        if self.kernel == "dequant":
            return swiglu_experts(x_TD, token_N, counts_E, weight_N, *(self.weight(n) for n in ("w1", "w3", "w2")))
        out_TD = torch.zeros_like(x_TD)
        for e, lo, hi in expert_slices(counts_E.tolist()):
            tok = token_N[lo:hi]
            x_n = x_TD[tok]
            a = quant_matmul(x_n, self.qw1[e], self.s1[e], self.kernel)
            b = quant_matmul(x_n, self.qw3[e], self.s3[e], self.kernel)
            h = F.silu(a) * b * weight_N[lo:hi, None].to(a.dtype)
            out_TD.index_add_(0, tok, quant_matmul(h, self.qw2[e], self.s2[e], self.kernel))
        return out_TD

    def dequantized(self) -> GroupedExperts:
        experts = GroupedExperts(self.n_experts, self.d_model, self.hidden, self.kernel_choice)
        experts.shard, experts.dispatch = self.shard, self.dispatch
        with torch.no_grad():
            for name in GroupedExperts.PARAM_NAMES:
                getattr(experts, name).data = self.weight(name)
        return experts


# ---- whole models ----------------------------------------------------------------------------
def quantized_modules(model: MoETransformer) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every module quantization replaces (the module docstring's list)."""
    found = []
    for block in model.layers.values():
        for name in ("wq", "wk", "wv", "wo"):
            found.append((block.attn, name, getattr(block.attn, name)))
        ffn = block.ffn
        mlps = [ffn] if isinstance(ffn, SwiGLU) else [m for m in (ffn.shared,) if m is not None]
        for mlp in mlps:
            found += [(mlp, name, getattr(mlp, name)) for name in ("w1", "w3", "w2")]
        if not isinstance(ffn, SwiGLU):
            found.append((ffn, "experts", ffn.experts))
    return found


@torch.no_grad()
def quantize_model(model: MoETransformer, cfg: QuantConfig) -> MoETransformer:
    """Replace the model's linear and expert weights by quantized ones (in place); `model.quantization`
    records the config. `method="none"` leaves the model as it is."""
    cfg.validate()
    if cfg.method == "none":
        return model
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization.method}); load it in full precision.")
    for parent, name, module in quantized_modules(model):
        new = QuantExperts(module, cfg) if isinstance(module, GroupedExperts) else QuantLinear(module, cfg)
        setattr(parent, name, new)
    model.quantization = cfg
    return model


@torch.no_grad()
def dequantize_model(model: MoETransformer) -> MoETransformer:
    """Back to full-precision modules holding the dequantized weights (in place)."""
    for parent, name, module in quantized_modules(model):
        if isinstance(module, (QuantLinear, QuantExperts)):
            setattr(parent, name, module.dequantized())
    model.quantization = None
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (what an export stores)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def config_dict(model: MoETransformer) -> dict | None:
    """The quantization entry an export's config.json holds (None: full precision)."""
    cfg = getattr(model, "quantization", None)
    return None if cfg is None else {"method": cfg.method, "fp8_block": cfg.fp8_block}


def quant_config_from_dict(d: dict | None, kernel: str = "auto") -> QuantConfig:
    return QuantConfig() if d is None else QuantConfig(d["method"], int(d.get("fp8_block", 0)), kernel)



# ---- the vLLM fp8 layout -----------------------------------------------------------------------
def _hf_base(model: MoETransformer, parent: nn.Module, name: str) -> str:
    """The stock transformers name (without `.weight`) of a quantized linear: attention, dense or shared."""
    from moe.hf import ATTN_NAMES, FFN_NAMES

    for i, block in model.layers.items():
        p = f"model.layers.{i}."
        if parent is block.attn:
            return p + "self_attn." + dict(ATTN_NAMES)[name]
        if parent is block.ffn:
            return p + "mlp." + dict(FFN_NAMES)[name]
        if getattr(block.ffn, "shared", None) is parent:
            return p + "mlp.shared_experts." + dict(FFN_NAMES)[name]
    raise KeyError(name)


def _glm_rows(model: MoETransformer, base: str, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Glm4Moe's half-split rotary order for q/k rows (moe/hf.py); a per-tile scale stays valid only
    when whole heads fill the tiles."""
    from moe.hf import GLM, hf_architecture, permute_heads

    cfg, block = model.cfg, model.quantization.fp8_block
    if hf_architecture(cfg) != GLM or not base.endswith(("q_proj", "k_proj")):
        return q, scale
    if block and block % cfg.head_dim and cfg.head_dim % block:
        raise ValueError(f"fp8_block={block} cuts heads of {cfg.head_dim} rows; the Glm export permutes rows "
                         "within heads: use fp8_block=0 or a multiple/divisor of the head dim.")
    return permute_heads(q.view(torch.uint8), cfg.head_dim).view(FP8), scale


def vllm_fp8_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """An fp8-quantized model's tensors under the names vLLM reads (the module docstring)."""
    from moe.hf import FFN_NAMES, to_hf_state_dict

    qc = getattr(model, "quantization", None)
    if qc is None or qc.method != "fp8":
        raise ValueError("export_vllm_fp8 needs an fp8 model: quantize_model(model, QuantConfig('fp8', ...)).")
    out = to_hf_state_dict(dequantize_model(copy.deepcopy(model)))  # embedding, norms, router, head
    scale_key = "weight_scale_inv" if qc.fp8_block else "weight_scale"
    for parent, name, module in quantized_modules(model):
        if isinstance(module, QuantLinear):
            base = _hf_base(model, parent, name)
            out[base + ".weight"], out[f"{base}.{scale_key}"] = _glm_rows(model, base, module.qweight, module.scale)
            continue
        i = next(k for k, b in model.layers.items() if b.ffn is parent)
        p = f"model.layers.{i}.mlp.experts."
        del out[p + "gate_up_proj"], out[p + "down_proj"]
        for ours, theirs in FFN_NAMES:
            q, s = getattr(module, f"q{ours}"), getattr(module, f"s{ours[1]}")
            for e in range(module.n_experts):
                out[f"{p}{e}.{theirs}.weight"], out[f"{p}{e}.{theirs}.{scale_key}"] = q[e], s[e]
    return {k: v.contiguous() for k, v in out.items()}


def export_vllm_fp8(model: MoETransformer, out_dir: str | Path, eos_id: int | None = None) -> Path:
    """config.json (the stock architecture's, plus `quantization_config`) and model.safetensors in the
    vLLM MoE fp8 layout."""
    from moe.hf import hf_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = vllm_fp8_state_dict(model)
    config = hf_config(model.cfg, eos_id).to_dict()
    block = model.quantization.fp8_block
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     **({"weight_block_size": [block, block]} if block else {})}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
