"""A preallocated key/value cache for the LLaMA decoder.

Every layer writes its new keys and values into fixed buffers, so decoding never reallocates and
shapes stay fixed. The cache also remembers which positions hold real tokens, so left padding is never attended to.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        growable: bool = False,
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self.growable = growable
        self.padded = False  # True once any row holds a masked position

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more; only caches made for DeepSeek-style open-ended calls grow."""
        need = self.length + new_tokens
        if need <= self.capacity:
            return
        if not self.growable:
            raise ValueError(f"KV cache full: {self.length} + {new_tokens} tokens > capacity {self.capacity}")
        capacity = max(need, 2 * self.capacity)
        for cache in (self.k, self.v):
            for i, buf in enumerate(cache):
                grown = buf.new_empty(buf.shape[0], buf.shape[1], capacity, buf.shape[3])
                grown[:, :, : self.length] = buf[:, :, : self.length]
                cache[i] = grown
        valid = self.valid.new_zeros(self.batch, capacity)
        valid[:, : self.length] = self.valid[:, : self.length]
        self.valid = valid

    def append_mask(self, mask: torch.Tensor) -> None:
        """Record which of the next T positions hold real tokens ([B, T] bool)."""
        self.valid[:, self.length : self.length + mask.shape[1]] = mask
        if not bool(mask.all()):
            self.padded = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, hd] at the current offset; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.length += T

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """Bool mask [B, 1, T, length+T] for the next T queries, or None when plain causal suffices."""
        end = self.length + T
        if not self.padded and (T == 1 or self.length == 0):
            return None
        q_pos = torch.arange(self.length, end, device=self.valid.device)[:, None]
        k_pos = torch.arange(end, device=self.valid.device)[None, :]
        causal = k_pos <= q_pos  # [T, end]
        # A pad query still attends to itself, so its row never becomes NaN and poisons nothing.
        mask = causal & (self.valid[:, None, :end] | (k_pos == q_pos))
        return mask[:, None]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (used when finished rows are dropped from a batch)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.valid = self.valid[rows]
