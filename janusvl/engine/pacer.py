"""How big a prompt chunk may be, so a prefill fits the engine's time budget between decode steps."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch


class PrefillPacer:
    """Sizes prompt chunks to fit what is left of the engine's time budget while other rows wait
    to decode. A chunk's time is modelled as overhead + tokens x per-token cost, fitted to the
    recent chunks: on CPUs without native bf16 each chunk pays a large fixed cost (the weights
    are widened to fp32 per call), so time per token alone would shrink the chunks forever."""

    def __init__(self, busy: Callable[[], bool]) -> None:
        self.busy = busy
        self.deadline = 0.0
        self.samples: deque[tuple[int, float]] = deque(maxlen=12)

    def size(self) -> int | None:
        if not self.busy():
            return None
        sizes = {n for n, _ in self.samples}
        if len(sizes) < 2:  # two different sizes make the model identifiable
            return 32 if not sizes else (64 if 32 in sizes else 32)
        overhead, per_token = self.fit()
        remaining = self.deadline - time.perf_counter()
        return int(min(max((remaining - overhead) / per_token, 16), 4096))

    def fit(self) -> tuple[float, float]:
        """(seconds per chunk, seconds per token), least squares over the recent chunks."""
        n = torch.tensor([s[0] for s in self.samples], dtype=torch.float64)
        t = torch.tensor([s[1] for s in self.samples], dtype=torch.float64)
        dn = n - n.mean()
        per_token = float((dn * (t - t.mean())).sum() / (dn * dn).sum().clamp(min=1e-9))
        per_token = max(per_token, 1e-6)
        return max(float(t.mean()) - per_token * float(n.mean()), 0.0), per_token

    def record(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))
