"""Feed many requests to one engine and collect each as it ends.

A batch job keeps at most `limit` requests unfinished in the engine (its running batch plus
as many waiting, so the next row joins as soon as one leaves) and hands back every request's
outcome in the order they finish. Items that already failed before reaching the engine (an
unreadable image) pass straight through, so one stream carries every row.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from PIL import Image

from ..engine import Delta, Engine, Failed, Finished, ImagesDone, Progress, RowDone
from ..engine.requests import Event, Request

K = TypeVar("K")


@dataclass
class Outcome(Generic[K]):
    """What one request produced: its answer (row 0) or its images, or the error."""
    key: K
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    images: list[Image.Image] = field(default_factory=list)
    error: BaseException | None = None


def run_requests(engine: Engine, items: Iterable[tuple[K, Request | BaseException]], limit: int,
                 on_progress: Callable[[Progress], None] | None = None) -> Iterator[Outcome[K]]:
    """Submit each item's request (at most `limit` unfinished at once) and yield outcomes as
    requests end. An item holding an exception is yielded as a failed outcome at once."""
    ended: queue.Queue[Outcome[K]] = queue.Queue()
    unfinished = 0
    for key, request in items:
        if isinstance(request, BaseException):
            yield Outcome(key, error=request)
            continue
        while unfinished >= limit:
            yield ended.get()
            unfinished -= 1
        request.emit = _listener(Outcome(key), ended, on_progress)
        engine.submit(request)
        unfinished += 1
        while not ended.empty():
            yield ended.get_nowait()
            unfinished -= 1
    for _ in range(unfinished):
        yield ended.get()


def _listener(outcome: Outcome[K], ended: queue.Queue[Outcome[K]],
              on_progress: Callable[[Progress], None] | None) -> Callable[[Event], None]:
    """Collects one request's events (from the engine's thread) into `outcome`."""
    def emit(event: Event) -> None:
        if isinstance(event, Delta) and event.row == 0:
            outcome.text += event.text
        elif isinstance(event, RowDone) and event.row == 0:
            outcome.finish_reason, outcome.completion_tokens = event.finish_reason, event.completion_tokens
        elif isinstance(event, Progress) and on_progress is not None:
            on_progress(event)
        elif isinstance(event, ImagesDone):
            outcome.images = event.images
        elif isinstance(event, Finished):
            outcome.prompt_tokens = event.prompt_tokens
            ended.put(outcome)
        elif isinstance(event, Failed):
            outcome.error = event.error
            ended.put(outcome)
    return emit
