"""What an engine holds, for tests and operators: queue and batch sizes, and the memory still held
by the requests it was given. "Alive" counts objects not yet freed anywhere in the process, so
a request that ended (finished, cancelled, failed) but is still referenced shows up as a leak."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..models.kv_cache import live_caches
from .jobs import ImageJob, Job
from .requests import ChatRequest, Request


@dataclass(frozen=True)
class EngineStats:
    waiting: int  # requests queued
    running: int  # requests admitted: prefilling, decoding or decoding their images
    rows: int  # rows of the decode batch (chat answers; two per generated image)
    requests_alive: int  # requests submitted and not yet freed
    jobs_alive: int
    kv_caches: int  # KV caches alive in the process (the library's own calls included)
    kv_bytes: int
    image_bytes: int  # pixels of chat images and code buffers of image jobs still alive
    feature_cache_bytes: int  # the image-feature cache (bounded by --image-cache-mb; kept on purpose)
    prefix_cache_bytes: int = 0  # keys and values of prompt prefixes (bounded by --prefix-cache-mb)


def _tensor_bytes(*tensors: object) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


def image_bytes(requests: Iterable[Request], jobs: Iterable[Job]) -> int:
    held = sum(_tensor_bytes(r.inputs.pixel_values) for r in requests if isinstance(r, ChatRequest))
    held += sum(_tensor_bytes(j.tokens) for j in jobs if isinstance(j, ImageJob))
    return held


def kv_totals() -> tuple[int, int]:
    """(KV caches alive, their bytes)."""
    caches = live_caches()
    return len(caches), sum(c.nbytes for c in caches)

