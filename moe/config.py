"""Model configuration: `MoEConfig` and `ModelConfig` dataclasses, their validation, and named presets;
`QuantConfig`, how moe/quant.py quantizes a built model (here so configs read it without torch).

These plain dataclasses are what `moe/` receives. The named presets live in `conf/model/*.yaml`
(tiny, small, deepseek_moe_16b, moe_67b), typed by these same dataclasses; entry points fill them
from Hydra and `ModelConfig.validate()` catches impossible values before any process starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


@dataclass
class MoEConfig:
    """Routed + shared experts and the router that chooses among them."""

    n_routed_experts: int = 16
    n_shared_experts: int = 1
    top_k: int = 2
    expert_hidden: int = 256  # hidden size of one fine-grained expert (and of each shared expert)
    score_func: str = "softmax"  # "softmax" | "sigmoid" (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalize the k chosen weights to sum to 1
    route_scale: float = 1.0
    aux_loss_coef: float = 0.001  # auxiliary load-balancing loss weight (0 disables)
    z_loss_coef: float = 0.0001  # router z-loss weight (0 disables)
    bias_update_rate: float = 0.001  # aux-loss-free balancing: per-expert bias step (0 disables)
    capacity_factor: float = 0.0  # 0: dropless; > 0: each expert keeps at most cf * T * k / E tokens
    expert_kernel: str = "auto"  # "auto" (measured per device) | "loop" | "grouped_mm"


@dataclass
class ModelConfig:
    """A decoder-only MoE transformer: the first `n_dense_layers` use a dense SwiGLU, the rest MoE."""

    name: str = "small"
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq_len: int = 512
    dense_hidden: int = 768
    n_dense_layers: int = 1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def validate(self, seq_len: int | None = None, prefix: str = "model") -> ModelConfig:
        """Raise `ConfigError` naming the key and the fix for any impossible combination."""
        m = self.moe
        positive = {
            "vocab_size": self.vocab_size, "d_model": self.d_model, "n_layers": self.n_layers,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "max_seq_len": self.max_seq_len,
            "dense_hidden": self.dense_hidden, "moe.n_routed_experts": m.n_routed_experts,
            "moe.top_k": m.top_k, "moe.expert_hidden": m.expert_hidden,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{prefix}.{key}={value} must be positive; set {prefix}.{key} to a value > 0.")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"{prefix}.d_model={self.d_model} is not divisible by {prefix}.n_heads={self.n_heads}; "
                f"choose n_heads among the divisors of d_model (e.g. {_divisor_near(self.d_model, self.n_heads)})."
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"{prefix}.d_model/{prefix}.n_heads={self.head_dim} is odd; rotary embeddings need an even head dim."
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{prefix}.n_heads={self.n_heads} is not divisible by {prefix}.n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs n_kv_heads to divide n_heads."
            )
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ConfigError(
                f"{prefix}.n_dense_layers={self.n_dense_layers} must be between 0 and n_layers={self.n_layers}."
            )
        if m.top_k > m.n_routed_experts:
            raise ConfigError(
                f"{prefix}.moe.top_k={m.top_k} > {prefix}.moe.n_routed_experts={m.n_routed_experts}; "
                "a token cannot pick more experts than exist: lower top_k or add experts."
            )
        if m.n_shared_experts < 0:
            raise ConfigError(f"{prefix}.moe.n_shared_experts={m.n_shared_experts} must be >= 0.")
        if m.score_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"{prefix}.moe.score_func={m.score_func!r}: use 'softmax' or 'sigmoid'.")
        if m.expert_kernel not in ("auto", "loop", "grouped_mm"):
            raise ConfigError(f"{prefix}.moe.expert_kernel={m.expert_kernel!r}: use 'auto', 'loop' or 'grouped_mm'.")
        if m.capacity_factor < 0:
            raise ConfigError(f"{prefix}.moe.capacity_factor={m.capacity_factor} must be >= 0 (0 means dropless).")
        for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(m, key) < 0:
                raise ConfigError(f"{prefix}.moe.{key}={getattr(m, key)} must be >= 0 (0 disables it).")
        if seq_len is not None and seq_len > self.max_seq_len:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds {prefix}.max_seq_len={self.max_seq_len}; "
                f"lower data.seq_len or raise {prefix}.max_seq_len to at least {seq_len}."
            )
        return self


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - target))


def expert_capacity(n_tokens: int, cfg: MoEConfig) -> int | None:
    """Tokens one expert may take in capacity mode, None when dropless."""
    if cfg.capacity_factor <= 0:
        return None
    return max(1, math.ceil(cfg.capacity_factor * n_tokens * cfg.top_k / cfg.n_routed_experts))


QUANT_METHODS = ("none", "int8", "fp8")
QUANT_KERNELS = ("auto", "int8_mm", "scaled_mm", "dequant")


@dataclass(frozen=True)
class QuantConfig:
    """How moe/quant.py quantizes a model: the method, the fp8 scale granularity and the kernel."""

    method: str = "none"  # none | int8 | fp8
    fp8_block: int = 0  # fp8 scales: 0 one per matrix (per expert), else one per (block x block) tile
    kernel: str = "auto"  # auto | int8_mm | scaled_mm | dequant

    def validate(self, prefix: str = "model") -> QuantConfig:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"{prefix}.quantization={self.method!r}: use one of {', '.join(QUANT_METHODS)}.")
        if self.fp8_block < 0:
            raise ValueError(f"{prefix}.fp8_block={self.fp8_block} must be 0 (per matrix) or a tile size like 128.")
        if self.kernel not in QUANT_KERNELS:
            raise ValueError(f"{prefix}.quant_kernel={self.kernel!r}: use one of {', '.join(QUANT_KERNELS)}.")
        if self.kernel == "int8_mm" and self.method != "int8" or self.kernel == "scaled_mm" and self.method != "fp8":
            raise ValueError(f"{prefix}.quant_kernel={self.kernel!r} does not run {self.method} weights: use auto, "
                             "dequant, or the kernel of the method (int8: int8_mm, fp8: scaled_mm).")
        return self
