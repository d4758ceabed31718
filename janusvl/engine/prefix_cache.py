"""Prompt prefixes already computed: the keys and values of their positions, reused by the next
prompt that starts the same way (what vLLM calls automatic prefix caching).

Every chat prompt starts with the same system prompt and template (DeepSeek's system prompt is
most of a short text question's ~100 tokens), and a prefill is compute-bound on a CPU: reusing
the prefix's keys and values skips most of a short prompt's prefill. A cached prefix stops
before the prompt's first image token (those positions' inputs are image features, which the
token ids that key this cache do not identify) and before its last token (whose logits the
answer needs). Entries live in an LRU bounded in bytes; a lookup takes the longest common prefix
with any entry. The reused keys and values are those the earlier prompt computed for the same
tokens at the same positions, so an answer differs from a fresh prefill's only by the order of
floating-point sums.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from ..models.kv_cache import KVCache


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int = 16,
                 on_reuse: Callable[[int], None] | None = None) -> None:
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.bytes = 0
        self._items: OrderedDict[tuple[int, ...], list[torch.Tensor]] = OrderedDict()  # ids -> k0, v0, k1, v1, ...
        self._on_reuse = on_reuse  # called with the number of prompt tokens reused

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def cacheable(ids: Sequence[int], image_positions: torch.Tensor | None) -> int:
        """How many leading tokens of a prompt may be cached: up to its first image token, and
        never its last token."""
        end = len(ids) - 1
        if image_positions is not None and bool(image_positions.any()):
            end = min(end, int(image_positions.int().argmax()))
        return max(end, 0)

    def restore(self, ids: Sequence[int], image_positions: torch.Tensor | None, cache: KVCache) -> int:
        """Write the longest cached prefix of `ids` into the empty one-row `cache`; returns its
        length (0: nothing reused)."""
        limit = self.cacheable(ids, image_positions)
        best, found = 0, None
        for key in self._items:
            n = _common(key, ids, limit)
            if n > best:
                best, found = n, key
        if found is None or best < self.min_tokens:
            return 0
        self._items.move_to_end(found)
        tensors = self._items[found]
        for layer in range(len(cache.k)):
            cache.k[layer][:, :, :best] = tensors[2 * layer][:, :, :best]
            cache.v[layer][:, :, :best] = tensors[2 * layer + 1][:, :, :best]
        cache.append_mask(torch.ones(1, best, dtype=torch.bool, device=cache.valid.device))
        cache.advance(best)
        if self._on_reuse is not None:
            self._on_reuse(best)
        return best

    def put(self, ids: Sequence[int], image_positions: torch.Tensor | None, cache: KVCache) -> None:
        """Keep the cacheable prefix of a prefilled one-row `cache`, unless an entry already holds it."""
        n = self.cacheable(ids, image_positions)
        if n < self.min_tokens or cache.batch != 1 or cache.length < n:
            return
        key = tuple(ids[:n])
        if any(_common(other, key, n) == n for other in self._items):
            return  # an entry already covers it
        tensors = [t[:, :, :n].clone() for pair in zip(cache.k, cache.v, strict=True) for t in pair]
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.max_bytes:
            return
        self._items[key] = tensors
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)


def _common(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
