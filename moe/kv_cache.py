"""The slot KV cache for decoding: keys and values of `n_slots` sequences for every layer.

`KVCache` holds (slots, max_len, n_kv_heads, head_dim) keys and values per layer and each slot's
cached length. `MoETransformer.forward(tokens, kv_cache=cache)` continues the sequences in the
slots chosen by `cache.begin(slots, T)`: rows take their own positions, write their new
keys/values and attend to everything cached before them; `commit` then records the new lengths.
`LayerKVCache` is one layer's view, handed to `Attention.forward`. The decoding loop that fills
the cache (sampling, sequences, the batch decoder) is moe/generate.py.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

import torch

from moe.config import ModelConfig


class KVCache:
    """Keys and values of `n_slots` sequences for every layer, plus each slot's cached length."""

    def __init__(self, cfg: ModelConfig, n_slots: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_len: int | None = None) -> None:
        self.max_len = max_len or cfg.max_seq_len
        shape = (n_slots, self.max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.lengths = [0] * n_slots
        self.device = torch.device(device)
        self._slots_B: torch.Tensor | None = None
        self._pos_BT = torch.zeros(0, 0, dtype=torch.long)
        self._mask_B1TS = torch.zeros(0, dtype=torch.bool)
        self._span = 0
        self._contiguous = False

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    def begin(self, slots: SequenceABC[int], n_tokens: int) -> None:
        """Prepare a forward pass of `n_tokens` new tokens for each of `slots` (one row per slot)."""
        starts = [self.lengths[s] for s in slots]
        span = max(starts) + n_tokens
        if span > self.max_len:
            raise ValueError(f"KV cache overflow: {span} positions > max_len={self.max_len}.")
        dev = self.device
        self._slots_B = torch.tensor(list(slots), device=dev, dtype=torch.long)
        self._contiguous = list(slots) == list(range(len(slots)))
        self._pos_BT = torch.tensor(starts, device=dev)[:, None] + torch.arange(n_tokens, device=dev)[None, :]
        keys_S = torch.arange(span, device=dev)
        self._mask_B1TS = (keys_S[None, None, :] <= self._pos_BT[:, :, None]).unsqueeze(1)
        self._span = span

    def rotary(self, cos_table: torch.Tensor, sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row rotary tables (B, 1, T, head_dim/2) for the positions prepared by `begin`."""
        return cos_table[self._pos_BT].unsqueeze(1), sin_table[self._pos_BT].unsqueeze(1)

    def layer(self, layer_id: int) -> LayerKVCache:
        return LayerKVCache(self, layer_id)

    def commit(self, slots: SequenceABC[int], n_new: SequenceABC[int]) -> None:
        """After the forward pass: slot s now holds n_new[i] more valid positions (padding excluded)."""
        for s, n in zip(slots, n_new):
            self.lengths[s] += n

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0


class LayerKVCache:
    """One layer's view of a `KVCache`, handed to `Attention.forward`."""

    def __init__(self, cache: KVCache, layer_id: int) -> None:
        self.cache, self.layer_id = cache, layer_id

    def update(self, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the new keys/values; return all keys/values of these rows (B, H, S, d) and the mask."""
        c = self.cache
        k_NSHd, v_NSHd = c.k[self.layer_id], c.v[self.layer_id]
        rows_B1 = c._slots_B[:, None]
        k_NSHd[rows_B1, c._pos_BT] = k_BHTd.transpose(1, 2).to(k_NSHd.dtype)
        v_NSHd[rows_B1, c._pos_BT] = v_BHTd.transpose(1, 2).to(v_NSHd.dtype)
        B, S = rows_B1.shape[0], c._span
        if c._contiguous:
            k_BSHd, v_BSHd = k_NSHd[:B, :S], v_NSHd[:B, :S]
        else:
            k_BSHd, v_BSHd = k_NSHd[c._slots_B, :S], v_NSHd[c._slots_B, :S]
        dtype = k_BHTd.dtype
        return k_BSHd.transpose(1, 2).to(dtype), v_BSHd.transpose(1, 2).to(dtype), c._mask_B1TS
