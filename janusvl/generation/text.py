"""Text generation with the LLaMA decoder: prefill once, then one token per step through a
preallocated KV cache. `generate_tokens` is the one loop that the library call, DeepSeek's
`language_model.generate`, the CLI and the server all drive."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import InputError
from ..models.kv_cache import KVCache
from ..models.llama import LlamaForCausalLM
from ..validation import check_length, integer
from .sampling import SamplingParams, make_generator, sample


def _token_ids(name: str, ids: object) -> list[int]:
    """None, one token id or a list of them, as a list of ints."""
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    items = ids if isinstance(ids, (list, tuple)) else [ids]
    return [integer(f"{name}[{i}]" if items is ids else name, t, minimum=0) for i, t in enumerate(items)]


def _eos_ids(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    return torch.tensor(_token_ids("eos_token_id", eos_token_id), dtype=torch.long, device=device)


def prefill(lm: LlamaForCausalLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
            cache: KVCache) -> torch.Tensor:
    """Run the whole (left-padded) prompt once; fp32 logits [B, V] for the first new token."""
    # Positions count real tokens only, as transformers' generate does for left-padded rows.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions,
             past_key_values=cache, logits_to_keep=1)
    return out.logits[:, -1].float()


def decode_step(lm: LlamaForCausalLM, ids: torch.Tensor, positions: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """Feed one token per row (ids [B] at positions [B, 1]); fp32 logits [B, V] for the next."""
    embeds = lm.get_input_embeddings()(ids)[:, None]  # [B, 1, D]
    ones = torch.ones(ids.shape[0], 1, dtype=torch.long, device=ids.device)
    out = lm(inputs_embeds=embeds, attention_mask=ones, position_ids=positions,
             past_key_values=cache, logits_to_keep=1)
    return out.logits[:, -1].float()


def generate_tokens(
    lm: LlamaForCausalLM,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    params: SamplingParams = SamplingParams(),
    min_new_tokens: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(ids [B], finished [B])` once per step. A row is finished from the step that
    produced its EOS on (later ids of that row are meaningless); the loop ends after
    `max_new_tokens` steps or when every row is finished, and the caller may stop earlier by
    closing the iterator. Rows are left-padded prompts. Arguments are checked now, not at the
    first step, so a bad request fails where it is made."""
    B, T, _ = inputs_embeds.shape
    max_new_tokens = check_length(T, max_new_tokens, lm.config.max_position_embeddings)
    min_new_tokens = integer("min_new_tokens", min_new_tokens, minimum=0)
    device = inputs_embeds.device
    mask = torch.ones(B, T, dtype=torch.long, device=device) if attention_mask is None \
        else attention_mask.to(device=device, dtype=torch.long)
    if tuple(mask.shape) != (B, T):
        raise InputError(f"attention_mask has shape {list(mask.shape)}, the embeddings need [{B}, {T}]")
    if generator is None:
        generator = make_generator(seed, device)
    return _loop(lm, inputs_embeds, mask, max_new_tokens, _eos_ids(eos_token_id, device), params,
                 min_new_tokens, generator)


@torch.inference_mode()
def _loop(lm: LlamaForCausalLM, inputs_embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
          eos: torch.Tensor, params: SamplingParams, min_new_tokens: int,
          generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    B, T, _ = inputs_embeds.shape
    cache = lm.model.new_cache(B, T + max_new_tokens)
    logits = prefill(lm, inputs_embeds, mask, cache)
    position = mask.sum(-1, keepdim=True)  # [B, 1]: the next token's position in each row
    finished = torch.zeros(B, dtype=torch.bool, device=inputs_embeds.device)
    for step in range(max_new_tokens):
        if step < min_new_tokens and eos.numel():
            logits[:, eos] = float("-inf")
        ids = sample(logits, params, generator)
        finished = finished | torch.isin(ids, eos)
        yield ids, finished
        if step + 1 == max_new_tokens or bool(finished.all()):
            return
        logits = decode_step(lm, ids, position, cache)
        position = position + 1


def generate(
    lm: LlamaForCausalLM,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **unused: object,
) -> torch.Tensor:
    """DeepSeek's `language_model.generate(...)`, with transformers' conventions: given
    `inputs_embeds`, the new ids [B, n]; given `input_ids`, those ids followed by the new ones.
    Rows are padded with `pad_token_id` (default: the first EOS id) after their EOS. Without an
    `attention_mask`, `input_ids` equal to the pad id are masked out (unless pad is an EOS id).
    Sampling defaults follow transformers' generate (`do_sample=False` is greedy; with sampling,
    top_k 50 unless given). Decoding always uses the KV cache; `use_cache` and `bos_token_id`
    are accepted for DeepSeek's call."""
    eos = _token_ids("eos_token_id", eos_token_id)
    if pad_token_id is not None:
        integer("pad_token_id", pad_token_id, minimum=0)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if inputs_embeds is None:
        if input_ids is None:
            raise InputError("generate needs inputs_embeds (or input_ids)")
        if attention_mask is None and pad_token_id is not None and pad not in eos:
            attention_mask = (input_ids != pad).long()
        inputs_embeds = lm.get_input_embeddings()(input_ids)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k or 0) if do_sample \
        else SamplingParams()
    columns: list[torch.Tensor] = []
    done = torch.zeros(inputs_embeds.shape[0], dtype=torch.bool, device=inputs_embeds.device)
    for ids, finished in generate_tokens(lm, inputs_embeds, attention_mask, max_new_tokens,
                                         eos_token_id, params, min_new_tokens, seed, generator):
        columns.append(torch.where(done, torch.full_like(ids, pad), ids))
        done = finished
    new = torch.stack(columns, dim=1)
    return new if input_ids is None else torch.cat([input_ids.to(new.device), new], dim=1)
