"""A preallocated key/value cache for the LLaMA decoder.

Every layer writes its new keys and values into fixed buffers, so decoding never reallocates and
shapes stay fixed. The cache also remembers which positions hold real tokens, so left padding is never attended to.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import torch

from .. import kernels
from .layers import attention, emulated

# Every cache not yet freed, wherever it is held: what lets a test (and Engine.stats) prove that
# finished, cancelled and failed requests leave no KV memory behind.
_LIVE: weakref.WeakSet[KVCache] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _track(cache: KVCache) -> None:
    with _LIVE_LOCK:
        _LIVE.add(cache)


def live_caches() -> list[KVCache]:
    """The KV caches alive in this process now (a cache goes when its last reference does)."""
    with _LIVE_LOCK:
        return list(_LIVE)


def decode_valid(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A decode step's attention mask [B, 1, 1, S] as `decode_attention` takes it: [B, S] (or None)."""
    return None if mask is None else mask[:, 0, 0, :]


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
        # Where bf16/fp16 are emulated (AVX2), torch's attention over a half-precision cache slows
        # down with the batch (8 rows: 3x the fp32 time): decoding attends through janusvl's
        # kernel there (`decode_attention`), or without it the cache holds the same values in fp32.
        if emulated(torch.empty(0, dtype=dtype, device=device)) and kernels.load() is None:
            dtype = torch.float32
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self.growable = growable
        self.padded = False  # True once any row holds a masked position
        _track(self)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, self.valid))

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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, enable_gqa: bool) -> torch.Tensor:
        """Store k, v [B, Hkv, T, hd] and attend q [B, H, T, hd] over every key so far."""
        k, v = self.update(layer, k, v)  # [B, Hkv, S, hd]
        if q.shape[2] == 1 and emulated(k) and (kernel := kernels.load()) is not None:
            out = kernel.decode_attention(q.float().contiguous(), k, v, decode_valid(mask), q.shape[-1] ** -0.5)
            return out.to(q.dtype)
        return attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                         enable_gqa=enable_gqa)

    def advance(self, T: int) -> None:
        self.length += T

    def next_positions(self) -> torch.Tensor:
        """[B, 1]: the position of each row's next token (rows written without left padding)."""
        return torch.full((self.batch, 1), self.length, dtype=torch.long, device=self.valid.device)

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

    def repeat(self, n: int) -> KVCache:
        """A cache of n copies of this one-row cache (n answers to one prefilled prompt)."""
        if self.batch != 1:
            raise ValueError(f"repeat needs a one-row cache, this one has {self.batch} rows")
        out = KVCache.__new__(KVCache)
        out.k = [k.expand(n, -1, -1, -1).clone() for k in self.k]
        out.v = [v.expand(n, -1, -1, -1).clone() for v in self.v]
        out.valid = self.valid.expand(n, -1).clone()
        out.length, out.growable, out.padded = self.length, self.growable, self.padded
        _track(out)
        return out

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (used when finished rows are dropped from a batch)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.valid = self.valid[rows]


class RaggedBatch:
    """Several caches stepped as one batch: the batch's rows are the caches' rows, in order.

    Each cache keeps its own length, so sequences that started at different times (continuous
    batching) share the decoder's matrix products while attention runs per cache, over exactly
    that cache's keys: a row's result is the one its own cache alone would give. Implements the
    part of KVCache's interface that the decoder uses."""

    def __init__(self, caches: Sequence[KVCache]) -> None:
        if not caches:
            raise ValueError("RaggedBatch needs at least one cache")
        self.caches = list(caches)
        self.sizes = [c.batch for c in self.caches]

    @property
    def batch(self) -> int:
        return sum(self.sizes)

    def reserve(self, new_tokens: int) -> None:
        for cache in self.caches:
            cache.reserve(new_tokens)

    def append_mask(self, mask: torch.Tensor) -> None:
        for cache, part in zip(self.caches, mask.split(self.sizes), strict=True):
            cache.append_mask(part)

    def attention_mask(self, T: int) -> list[torch.Tensor | None]:
        return [cache.attention_mask(T) for cache in self.caches]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: list[torch.Tensor | None], enable_gqa: bool) -> torch.Tensor:
        parts = zip(self.caches, mask, q.split(self.sizes), k.split(self.sizes), v.split(self.sizes),
                    strict=True)
        out = [cache.attend(layer, q_, k_, v_, m, enable_gqa) for cache, m, q_, k_, v_ in parts]
        return out[0] if len(out) == 1 else torch.cat(out)

    def advance(self, T: int) -> None:
        for cache in self.caches:
            cache.advance(T)

    def next_positions(self) -> torch.Tensor:
        return torch.cat([cache.next_positions() for cache in self.caches])
