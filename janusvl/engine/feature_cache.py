"""An LRU cache of aligned image features, keyed by the image's content.

The vision tower is the costliest part of a prompt with an image (seconds on a CPU); a client
that asks several questions about one picture sends the same bytes each time. Features are the
exact tensors `encode_images` returned, so answers are the same with and without the cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureCache:
    def __init__(self, max_bytes: int, on_lookup: Callable[[bool], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._on_lookup = on_lookup  # called with True for a hit, False for a miss

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str | None) -> torch.Tensor | None:
        if key is None:
            return None
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        if self._on_lookup is not None:
            self._on_lookup(found is not None)
        return found

    def put(self, key: str | None, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if key is None or key in self._items or size > self.max_bytes:
            return
        self._items[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
