"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import validation


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        # Checked and stored in their canonical types (the dataclass is frozen, hence setattr).
        object.__setattr__(self, "temperature", validation.temperature("temperature", self.temperature))
        object.__setattr__(self, "top_p", validation.number("top_p", self.top_p, above=0.0, maximum=1.0))
        object.__setattr__(self, "top_k", validation.integer("top_k", self.top_k, minimum=0))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on fp32 logits [B, V]; removed entries -> -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        # The likeliest token always stays (as transformers keeps min_tokens_to_keep=1): a top_p
        # below float32's smallest value compares as 0 and would otherwise drop every token.
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids [B] from logits [B, V]."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    seed = validation.seed("seed", seed)
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class ChatOptions:
    """A chat call's checked arguments. `max_new_tokens` None lets the caller fill in the room
    the context leaves (the engine does)."""

    max_new_tokens: int | None
    params: SamplingParams
    seed: int | None
    stop: tuple[str, ...]

    @classmethod
    def check(cls, max_new_tokens: object = 256, temperature: object = 0.0, top_p: object = 1.0,
              top_k: object = 0, seed: object = None, stop: object = None) -> ChatOptions:
        """Raises InputError naming the first bad argument."""
        if max_new_tokens is not None:
            max_new_tokens = validation.integer("max_new_tokens", max_new_tokens, minimum=1)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)  # type: ignore[arg-type]
        return cls(max_new_tokens, params, validation.seed("seed", seed), tuple(validation.stop_list(stop)))
