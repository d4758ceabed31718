"""The engine's and the server's Prometheus metrics, counted where each event happens.

prometheus-client comes with the `serve` extra; without it (the engine driven from a notebook or
a batch job) every metric is a no-op.
"""

from __future__ import annotations

from typing import Any

# Seconds; time to first token spans a CPU prefill of an image prompt (tens of seconds).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5)


class _Noop:
    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Noop:
        return self


class Metrics:
    """One registry per server, so several servers in one process (tests) do not collide."""

    def __init__(self, enabled: bool = True) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            prom = None
        if prom is None or not enabled:
            self.registry = None
            for name in ("running", "waiting", "prompt_tokens", "generated_tokens", "ttft", "tpot",
                         "latency", "images", "image_steps", "rejected", "cache_hits", "cache_misses",
                         "failed", "kv_bytes", "prefix_tokens"):
                setattr(self, name, _Noop())
            return
        r = self.registry = prom.CollectorRegistry()
        p = "janusvl_"
        self.running = prom.Gauge(p + "requests_running", "Requests being prefilled or decoded", registry=r)
        self.waiting = prom.Gauge(p + "requests_waiting", "Requests queued for the engine", registry=r)
        self.prompt_tokens = prom.Counter(p + "prompt_tokens", "Prompt tokens prefilled (image tokens included)",
                                          registry=r)
        self.generated_tokens = prom.Counter(p + "generation_tokens", "Text tokens generated", registry=r)
        self.ttft = prom.Histogram(p + "time_to_first_token_seconds", "From arrival to the first token",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = prom.Histogram(p + "time_per_output_token_seconds",
                                   "Mean time between tokens after the first, per request",
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.latency = prom.Histogram(p + "request_latency_seconds", "From arrival to the last event",
                                      ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = prom.Counter(p + "image_generations", "Images generated", registry=r)
        self.image_steps = prom.Counter(p + "image_generation_steps", "Image tokens drawn (576 per image)",
                                        registry=r)
        self.rejected = prom.Counter(p + "rejected_requests", "Requests refused, by reason", ["reason"],
                                     registry=r)
        self.failed = prom.Counter(p + "failed_requests", "Requests that failed inside the engine", registry=r)
        self.kv_bytes = prom.Gauge(p + "kv_cache_bytes", "Memory held by KV caches (read when scraped)",
                                   registry=r)
        self.cache_hits = prom.Counter(p + "image_cache_hits", "Images whose features came from the cache",
                                       registry=r)
        self.cache_misses = prom.Counter(p + "image_cache_misses", "Images encoded by the vision tower",
                                         registry=r)

        self.prefix_tokens = prom.Counter(p + "prefix_cache_tokens", "Prompt tokens whose keys and values came "
                                          "from the prefix cache instead of a prefill", registry=r)

    def cache_lookup(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format Prometheus scrapes, and its content type."""
        import prometheus_client as prom

        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
