"""MoETransformer: token embedding -> blocks (attention + dense or MoE feed-forward) -> norm -> head.

Written for one device. `build_meta_model` creates it on the meta device, where parallelism
(moe/parallel) transforms the module tree before any memory is spent; `materialize` then allocates
and initializes what is left on the target device (`build_model` does both for one device).
Layers sit in a `ModuleDict` keyed by layer index so pipeline stages can drop the ones they do
not own (moe/parallel/pipeline.py); `forward` skips a missing embedding, norm or head for the same
reason, and `init_weights` draws what the whole model draws so a stage's values equal the whole model's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe.config import ModelConfig
from moe.layers import Attention, RMSNorm, SwiGLU, rotary_tables
from moe.moe import MoE

if TYPE_CHECKING:
    from moe.kv_cache import KVCache, LayerKVCache


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_id) else SwiGLU(cfg.d_model, cfg.dense_hidden)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, kv_cache)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))

    def init_weights(self, std: float, out_std: float) -> None:
        self.attn_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attn.init_weights(std, out_std)
        self.ffn.init_weights(std, out_std)


def _transient_block(cfg: ModelConfig, layer_id: int, device: torch.device) -> Block:
    """An uninitialized layer (built on meta, so construction draws no random numbers)."""
    with torch.device("meta"):
        block = Block(cfg, layer_id)
    return block.to_empty(device=device)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head: nn.Linear | None = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens_BT: torch.Tensor, kv_cache: KVCache | None = None,
                logits_at_BK: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V). A pipeline stage without an embedding takes (B, T, D).

        `kv_cache` (decoding, moe/kv_cache.py): the rows continue sequences whose earlier keys and
        values are cached; their positions come from the cache, which this call extends by T.
        `logits_at_BK` (positions in [0, T), one row per batch row): logits (B, K, V) at those
        positions only, the rows the full call would give there. The head is a prefill's largest
        matmul, and sampling reads one position per prompt (as transformers' `logits_to_keep`).
        """
        h_BTD = self.tok_emb(tokens_BT) if self.tok_emb is not None else tokens_BT
        T = h_BTD.shape[1]
        if kv_cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = kv_cache.rotary(self.rope_cos, self.rope_sin)
        for name, block in self.layers.items():
            h_BTD = block(h_BTD, cos, sin, None if kv_cache is None else kv_cache.layer(int(name)))
        if self.head is None:
            return self.norm(h_BTD) if self.norm is not None else h_BTD
        if logits_at_BK is not None:  # norm and head act on each position alone: select first
            h_BTD = h_BTD.gather(1, logits_at_BK[:, :, None].expand(-1, -1, h_BTD.shape[-1]))
        if self.norm is not None:
            h_BTD = self.norm(h_BTD)
        return self.head(h_BTD)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize what this module holds from the current random state, drawing exactly what the
        whole model draws: a unit a pipeline stage does not hold (moe/parallel/pipeline.py) is drawn
        into a transient copy on the same device and dropped, so the units it does hold get the
        whole model's values (transient memory: one layer)."""
        cfg = self.cfg
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        device = self.rope_cos.device
        emb = self.tok_emb if self.tok_emb is not None else torch.empty(cfg.vocab_size, cfg.d_model, device=device)
        nn.init.normal_(emb.weight if isinstance(emb, nn.Embedding) else emb, std=1.0)
        for i in range(cfg.n_layers):
            block = self.layers[str(i)] if str(i) in self.layers else _transient_block(cfg, i, device)
            block.init_weights(std, out_std)
        if self.norm is not None:
            self.norm.init_weights()
        head = self.head.weight if self.head is not None else torch.empty(cfg.vocab_size, cfg.d_model, device=device)
        nn.init.trunc_normal_(head, std=cfg.d_model ** -0.5)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def moe_layers(self) -> dict[str, MoE]:
        """MoE feed-forward modules by layer id (only the layers this module still holds)."""
        return {name: block.ffn for name, block in self.layers.items() if isinstance(block.ffn, MoE)}

    def aux_losses(self) -> dict[str, float]:
        """Last auxiliary and z losses, summed over MoE layers (detached, for logging)."""
        layers = self.moe_layers().values()
        return {
            "aux_loss": float(sum(float(m.last_aux_loss) for m in layers)),
            "z_loss": float(sum(float(m.last_z_loss) for m in layers)),
        }


def build_meta_model(cfg: ModelConfig) -> MoETransformer:
    """The model's structure on the meta device: no memory, ready to be parallelized, then materialized."""
    with torch.device("meta"):
        return MoETransformer(cfg)


def materialize(model: MoETransformer, device: torch.device | str = "cpu", seed: int | None = 0,
                dtype: torch.dtype = torch.float32) -> MoETransformer:
    """Allocate the parameters the (possibly sharded) meta model holds on `device` and initialize them.

    For the same seed the values equal the one-device model's, on every rank alike: a pipeline stage
    draws (and drops) what the layers it does not hold would draw, and an expert shard draws what the
    whole layer would and keeps its slice (see `GroupedExperts.init_weights`).
    """
    model.to_empty(device=device)
    for moe in model.moe_layers().values():  # logging values kept outside buffers were made on meta
        moe.last_aux_loss = moe.last_z_loss = torch.zeros((), device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model.to(dtype)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> MoETransformer:
    """The whole one-device model: `build_meta_model`, then `materialize` on `device`."""
    return materialize(build_meta_model(cfg), device, seed, dtype)
