"""What is submitted to the engine, and the events it sends back.

A request carries its own state: the prepared inputs, its sampling parameters, where its events
go (`emit`, called from the engine's thread) and whether its submitter has given up on it
(`cancel()`, honoured at the engine's next step).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..generation.sampling import SamplingParams
from ..processing.processor import BatchedVLChatProcessorOutput


@dataclass(frozen=True)
class Delta:
    """One new token of one answer (row) of a chat request, and the text it made final ("" while
    the text is held back)."""
    row: int
    text: str


@dataclass(frozen=True)
class RowDone:
    row: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    completion_tokens: int


@dataclass(frozen=True)
class Progress:
    """An image request's generation step: `step` of `total` image tokens are drawn."""
    step: int
    total: int


@dataclass(frozen=True)
class ImagesDone:
    images: list[Image.Image]


@dataclass(frozen=True)
class Finished:
    """The last event of a request that succeeded."""
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The last event of a request that failed inside the engine."""
    error: BaseException


Event = Delta | RowDone | Progress | ImagesDone | Finished | Failed

_ids = itertools.count(1)


def _ignore(event: Event) -> None:
    pass


@dataclass(kw_only=True)
class Request:
    emit: Callable[[Event], None] = _ignore
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """Give up on this request: the engine drops it (and frees its memory) at its next step."""
        self.cancelled = True


@dataclass(kw_only=True)
class ChatRequest(Request):
    """`n` answers to one prompt. `inputs` is the processor's batch of one; `image_keys` names
    each image by content (for the engine's feature cache), or None where it is unknown."""
    inputs: BatchedVLChatProcessorOutput
    image_keys: Sequence[str | None]
    max_new_tokens: int
    params: SamplingParams = SamplingParams()
    n: int = 1
    seed: int | None = None
    stop: Sequence[str] = ()

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs.input_ids.shape[1])

    @property
    def rows(self) -> int:
        return self.n


@dataclass(kw_only=True)
class ImageRequest(Request):
    """`n` images of one prompt; `prompt_ids` are the tokens of `image_prompt(...)`."""
    prompt_ids: torch.Tensor  # [T]
    n: int = 1
    cfg_weight: float = 5.0
    temperature: float = 1.0
    seed: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def rows(self) -> int:
        return 2 * self.n  # classifier-free guidance: a conditional and an unconditional row each
