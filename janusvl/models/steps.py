"""Stepwise computations: generators that yield between the pieces of a long forward pass (a
vision tower, an image decoder) so the serving engine can decode running rows in between. The
pieces are the same operations in the same order, so the result is the plain forward's."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")

Steps = Generator[None, None, T]


def finish(steps: Steps[T]) -> T:
    """Run a stepwise computation to its end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
