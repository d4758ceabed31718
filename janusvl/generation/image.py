"""Text-to-image generation (spec §5), as DeepSeek's generation_inference.py does it.

Classifier-free guidance runs 2n rows in one batch: even rows see the prompt, odd rows the same
prompt with everything but its first and last token replaced by the pad id. One prefill fills a
preallocated KV cache; each step then guides the gen_head logits, samples one VQ code per pair
and feeds its embedding to both rows. VQ-16 turns the codes into pixels.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from .. import validation
from ..errors import ContextLengthError, InputError
from ..validation import MAX_CFG_WEIGHT, MAX_IMAGES
from ..messages import detect_roles
from ..models.janus import MultiModalityCausalLM
from ..models.steps import Steps, finish
from ..models.vq import pixels_to_pil
from ..processing.processor import VLChatProcessor
from .sampling import make_generator

# Maps guided fp32 logits [n, V] to the next VQ code ids [n].
Sampler = Callable[[torch.Tensor], torch.Tensor]


def image_prompt(processor: VLChatProcessor, prompt: str, roles: tuple[str, str] | None = None) -> str:
    """DeepSeek's generation prompt: the chat template with an empty system prompt, then
    `<begin_of_image>` so that the next token the model predicts is the first image code."""
    user, assistant = roles or detect_roles(processor.tokenizer)
    text = processor.apply_sft_template_for_multi_turn_prompts(
        conversations=[{"role": user, "content": prompt}, {"role": assistant, "content": ""}],
        sft_format=processor.sft_format,
        system_prompt="",
    )
    return text + processor.image_start_tag


def image_prompt_ids(model: MultiModalityCausalLM, processor: VLChatProcessor, prompt: str,
                     roles: tuple[str, str] | None = None, plain_text: bool = False) -> list[int]:
    """The ids of `image_prompt`, checked to leave room in the context for the image's tokens.
    With `plain_text`, special-token strings in `prompt` are encoded as ordinary text."""
    if roles is not None:
        roles = validation.roles(roles)
    if plain_text:
        plain = processor.plain_text
        ids = plain.encode(image_prompt(processor, plain.escape(prompt), roles))
    else:
        ids = processor.tokenizer.encode(image_prompt(processor, prompt, roles))
    steps = image_grid(model) ** 2
    limit = model.config.language_config.max_position_embeddings
    if len(ids) + steps > limit:
        raise ContextLengthError(f"prompt is {len(ids)} tokens; with {steps} image tokens that exceeds the "
                                 f"model's context of {limit} (max_position_embeddings)", len(ids), steps, limit)
    return ids


def cfg_input_ids(prompt_ids: Sequence[int], n: int, pad_id: int) -> torch.Tensor:
    """[2n, T] ids: rows 0, 2, ... conditional, rows 1, 3, ... unconditional (only the first
    token, BOS, and the last, `<begin_of_image>`, survive; the rest become pad)."""
    cond = torch.tensor(list(prompt_ids), dtype=torch.long)
    uncond = cond.clone()
    uncond[1:-1] = pad_id
    return torch.stack((cond, uncond)).repeat(n, 1)


def image_grid(model: MultiModalityCausalLM) -> int:
    """Codes per side: the image side over VQ-16's downsampling (384 / 16 = 24)."""
    return model.config.vision_config.image_size // model.config.gen_vision_config.downsample


def check_image_args(prompt: object, n: object, cfg_weight: object, temperature: object,
                     seed: object = None) -> tuple[int, float, float, int | None]:
    """(n, cfg_weight, temperature, seed) checked, or InputError naming the first bad argument;
    cheap, so callers run it before loading."""
    validation.text("prompt", prompt, allow_empty=False)
    return (validation.integer("n", n, minimum=1, maximum=MAX_IMAGES),
            validation.number("cfg_weight", cfg_weight, above=0.0, maximum=MAX_CFG_WEIGHT),
            validation.temperature("temperature", temperature, greedy_allowed=False),
            validation.seed("seed", seed))


def image_memory(model: MultiModalityCausalLM, n: int, prompt_tokens: int) -> int:
    """Bytes `n` images need at least: the KV cache of their 2n guided rows, and the prefill's
    widest activation (the MLP's gate and up projections of every prompt position, in fp32)."""
    cfg = model.config.language_config
    rows, capacity = 2 * n, prompt_tokens + image_grid(model) ** 2
    element = model.language_model.get_input_embeddings().weight.element_size()
    kv = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * capacity * cfg.head_dim * element
    return kv + rows * prompt_tokens * 2 * cfg.intermediate_size * 4


def check_image_memory(model: MultiModalityCausalLM, n: int, prompt_tokens: int) -> None:
    """Refuse `n` images when the device cannot hold them, before anything is allocated."""
    need = image_memory(model, n, prompt_tokens)
    validation.check_memory("n", need, validation.available_memory(model.device), f"generating {n} image(s)")


def multinomial_sampler(temperature: float, generator: torch.Generator | None) -> Sampler:
    """DeepSeek's draw: one sample from softmax(logits / temperature) per row."""
    def draw(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / temperature, dim=-1)
        if logits.dtype == torch.float16:
            # A small temperature can scale float16 logits past its largest value (softmax then
            # gives NaN): such rows are scaled in float32 instead, every other row as before.
            overflow = torch.isinf(logits / temperature).any(-1, keepdim=True)
            wide = torch.softmax(logits.float() / temperature, dim=-1).to(probs.dtype)
            probs = torch.where(overflow, wide, probs)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return draw


@torch.inference_mode()
def image_token_steps(model: MultiModalityCausalLM, input_ids: torch.Tensor, cfg_weight: float,
                      sampler: Sampler, steps: int) -> Iterator[torch.Tensor]:
    """Yield the next code ids [n] for `steps` steps; `input_ids` [2n, T] come from cfg_input_ids."""
    lm = model.language_model.model
    B, T = input_ids.shape
    cache = lm.new_cache(B, T + steps)
    x = model.language_model.get_input_embeddings()(input_ids.to(model.device))  # [2n, T, D]
    for step in range(steps):
        h = lm(inputs_embeds=x, use_cache=True, past_key_values=cache).last_hidden_state[:, -1]
        # [2n, V] in the model's dtype: DeepSeek's script guides and samples in it, and so do we,
        # so a bf16 model draws exactly the codes DeepSeek's code draws.
        logits = model.gen_head(h)
        cond, uncond = logits[0::2], logits[1::2]
        ids = sampler(uncond + cfg_weight * (cond - uncond))
        yield ids
        if step + 1 < steps:
            # Both rows of a pair continue with the code the pair drew.
            x = model.prepare_gen_img_embeds(ids.repeat_interleave(2))[:, None]  # [2n, 1, D]


def generate_image_tokens(
    model: MultiModalityCausalLM,
    processor: VLChatProcessor,
    prompt: str,
    n: int = 1,
    cfg_weight: float = 5.0,
    temperature: float = 1.0,
    seed: int | None = None,
    progress: bool = False,
    roles: tuple[str, str] | None = None,
    sampler: Sampler | None = None,
) -> torch.Tensor:
    """VQ code ids [n, grid*grid] (row-major over the grid) for `n` images of `prompt`.

    `seed` seeds a torch.Generator on the model's device, so the same seed and arguments give the
    same codes (None: torch's global RNG). `progress` shows a bar on stderr. `roles` overrides the
    detected (user, assistant) role names. `sampler`, when given, replaces the draw from
    softmax(guided / temperature): it gets the guided logits (model dtype) [n, V] and returns ids [n].
    """
    n, cfg_weight, temperature, seed = check_image_args(prompt, n, cfg_weight, temperature, seed)
    ids = image_prompt_ids(model, processor, prompt, roles)
    check_image_memory(model, n, len(ids))
    steps = image_grid(model) ** 2
    if sampler is None:
        sampler = multinomial_sampler(temperature, make_generator(seed, model.device))
    input_ids = cfg_input_ids(ids, n, processor.pad_id)
    tokens = torch.empty(n, steps, dtype=torch.long, device=model.device)
    bar = tqdm(image_token_steps(model, input_ids, cfg_weight, sampler, steps), total=steps,
               disable=not progress, file=sys.stderr, desc="image tokens", unit="tok")
    for i, step_ids in enumerate(bar):
        tokens[:, i] = step_ids
    return tokens


@torch.inference_mode()
def decode_image_tokens(model: MultiModalityCausalLM, tokens: torch.Tensor, chunk: int = 8) -> list[Image.Image]:
    """Code ids [n, grid*grid] -> n RGB images, decoded `chunk` at a time (in the model's dtype) so
    the decoder's full-resolution activations stay bounded for large n."""
    return finish(decode_image_tokens_steps(model, tokens, chunk))


def decode_image_tokens_steps(model: MultiModalityCausalLM, tokens: torch.Tensor,
                              chunk: int = 8) -> Steps[list[Image.Image]]:
    """`decode_image_tokens` in pieces (one VQ decoder block per step), for the serving engine."""
    grid = image_grid(model)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] != grid * grid:
        raise InputError(f"tokens must have shape [n, {grid * grid}], got {list(getattr(tokens, 'shape', []))}")
    codes = model.config.gen_vision_config.image_token_size
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InputError(f"tokens must be integer code ids, got {tokens.dtype}")
    if tokens.numel() and not bool(((tokens >= 0) & (tokens < codes)).all()):
        raise InputError(f"tokens must be code ids in 0..{codes - 1}")
    vq = model.gen_vision_model
    images: list[Image.Image] = []
    for part in tokens.to(model.device).split(chunk):
        pixels = yield from vq.decode_code_steps(part, shape=[part.shape[0], vq.config.n_embed, grid, grid])
        images.extend(pixels_to_pil(pixels))
    return images


def generate_images(
    model: MultiModalityCausalLM,
    processor: VLChatProcessor,
    prompt: str,
    n: int = 1,
    cfg_weight: float = 5.0,
    temperature: float = 1.0,
    seed: int | None = None,
    progress: bool = False,
    roles: tuple[str, str] | None = None,
) -> list[Image.Image]:
    """`n` images (RGB, 384 x 384 for the released models) generated from the text `prompt`.

    cfg_weight is the classifier-free guidance scale and temperature divides the guided logits
    (DeepSeek's defaults: 5 and 1). The same seed and arguments give the same images; the n images
    of one call are different samples, and image i depends on n (the rows share one batch).
    """
    tokens = generate_image_tokens(model, processor, prompt, n=n, cfg_weight=cfg_weight,
                                   temperature=temperature, seed=seed, progress=progress, roles=roles)
    return decode_image_tokens(model, tokens)
