"""The high-level API: `Janus.from_pretrained(...)`, then `.chat(...)` / `.chat_batch(...)`.

Every call drives the one decode loop, `generation.text.generate_tokens`: a batch of
conversations is left-padded into one pass, each row's ids go through its own `TextStream`
(incremental detokenizer + stop strings), and rows leave the batch's bookkeeping as they end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import validation
from .errors import InputError
from .generation.sampling import ChatOptions
from .generation.stream import TextStream
from .generation.text import generate_tokens
from .messages import Messages, build_conversation, detect_roles
from .models.janus import MultiModalityCausalLM
from .processing import ImageSource, VLChatProcessor, apply_sft_template
from .processing.images_io import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImageLimits


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    prompt_tokens: int  # image tokens included
    completion_tokens: int  # the EOS, or the token that completed a stop string, included


@dataclass(frozen=True)
class Prompt:
    """A conversation rendered and tokenized, its images not yet opened."""
    text: str
    ids: list[int]  # image spans expanded
    images: list[ImageSource]


class _Run:
    """One batched generation: yields (row, text chunk) as text becomes final."""

    def __init__(self, janus: Janus, prompts: Sequence[Prompt], options: ChatOptions) -> None:
        processor, model = janus.processor, janus.model
        assert options.max_new_tokens is not None
        # Images are opened only now, after every row's length has been checked.
        outputs = [processor.with_images(p.text, p.ids, p.images) for p in prompts]
        inputs = processor.batchify(outputs).to(model.device, model.dtype)
        with torch.inference_mode():
            embeds = model.prepare_inputs_embeds(**inputs)
        self.prompt_tokens = [len(o) for o in outputs]
        self._steps = generate_tokens(model.language_model, embeds, inputs.attention_mask, options.max_new_tokens,
                                      janus.tokenizer.eos_token_id, options.params, seed=options.seed)
        self.streams = [TextStream(janus.tokenizer, options.stop) for _ in outputs]
        self.counts = [0] * len(outputs)
        self.reasons: list[str | None] = [None] * len(outputs)

    def events(self) -> Iterator[tuple[int, str]]:
        try:
            for ids, finished in self._steps:
                for row, (token, eos) in enumerate(zip(ids.tolist(), finished.tolist(), strict=True)):
                    if self.reasons[row] is None:
                        yield from self._push(row, token, eos)
                if all(self.reasons):
                    break
            for row, reason in enumerate(self.reasons):
                if reason is None:
                    self.reasons[row] = "length"
                    yield row, self.streams[row].finish()
        finally:
            self._steps.close()  # frees the KV cache when a consumer stops early

    def _push(self, row: int, token: int, eos: bool) -> Iterator[tuple[int, str]]:
        stream = self.streams[row]
        self.counts[row] += 1
        yield row, stream.push(token)
        if eos or stream.stopped:
            self.reasons[row] = "stop"
            yield row, stream.finish()

    def results(self) -> list[ChatResult]:
        return [ChatResult(s.text, r or "length", p, c)
                for s, r, p, c in zip(self.streams, self.reasons, self.prompt_tokens, self.counts, strict=True)]


class ChatStream:
    """Iterator over the answer's text chunks. When it is exhausted, `result` holds the
    `ChatResult` (reading `result` earlier runs the generation to its end first)."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._rows = run.events()
        self._events = (chunk for _, chunk in self._rows if chunk)
        self._result: ChatResult | None = None

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._events)
        except StopIteration:
            self._result = self._run.results()[0]
            raise

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return self._run.streams[0].text

    @property
    def result(self) -> ChatResult:
        if self._result is None:
            for _ in self:
                pass
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Stop generating (the result then reports what was produced, finish_reason "length")."""
        self._events.close()
        self._rows.close()
        self._result = self._run.results()[0]


class Janus:
    """A loaded Janus model with a chat interface. `.model`, `.processor` and `.tokenizer` are
    DeepSeek's objects (`MultiModalityCausalLM`, `VLChatProcessor`, its tokenizer)."""

    def __init__(self, model: MultiModalityCausalLM, processor: VLChatProcessor,
                 roles: tuple[str, str] | None = None) -> None:
        processor.check_model(model.config)
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.roles = validation.roles(roles) if roles else detect_roles(self.tokenizer)

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = "auto", revision: str | None = None,
                        roles: tuple[str, str] | None = None, quantize: str | None = None,
                        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, exif_transpose: bool = False,
                        allow_nonfinite: bool = False) -> Janus:
        """Load a checkpoint directory or Hub id. `device` "auto" picks cuda, mps, then cpu;
        `dtype` "auto" keeps the checkpoint's dtype. `roles` overrides the detected role names.
        The decoder and the image-generation head get the kernels `janusvl.models.fast` picks for
        this CPU (bit-identical where bf16 is native, fp32 sums of the exact weights elsewhere);
        `quantize="int8"` or `"int4"` also stores its weights in 8 or 4 bits (faster decoding, a
        small logit error documented in the README). A checkpoint written by `janusvl convert
        --quantize` loads quantised as stored; another `quantize` for it is an InputError.

        Images larger than `max_image_pixels` (read from the header, before decoding) or
        `max_image_bytes` (encoded) are refused; `exif_transpose=True` turns photos upright by
        their EXIF orientation (DeepSeek's pipeline ignores it, so the default does too).
        Weights holding NaN or infinity are refused unless `allow_nonfinite=True`."""
        from .config import JanusConfig
        from .loading.checkpoint import load_model
        from .loading.hub import resolve_checkpoint
        from .loading.quantized import resolve_quantize
        from .models.fast import optimize, optimize_generation

        if quantize not in (None, "none", "int8", "int4"):
            raise InputError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
        limits = ImageLimits(max_image_pixels, max_image_bytes, exif_transpose)
        root = resolve_checkpoint(model, revision)
        stored = JanusConfig.from_file(root / "config.json").quantization_config
        quantize = resolve_quantize(root, stored and stored.scheme, quantize)
        processor = VLChatProcessor.from_pretrained(root, image_limits=limits)
        vl_gpt = load_model(root, device=device, dtype=dtype, allow_nonfinite=allow_nonfinite)
        optimize(vl_gpt.language_model, quantize)
        optimize_generation(vl_gpt.gen_head, vl_gpt.gen_aligner)
        return cls(vl_gpt, processor, roles)

    def build_prompt(self, messages: Messages | str,
                     roles: tuple[str, str] | None = None) -> tuple[str, list[ImageSource]]:
        """The prompt text the model will see for `messages`, and their images in tag order."""
        conv = build_conversation(messages, roles or self.roles, self.processor.image_tag)
        system = self.processor.system_prompt if conv.system_prompt is None else conv.system_prompt
        return apply_sft_template(conv.messages, self.processor.sft_format, system), conv.images

    def prompt(self, messages: Messages | str, roles: tuple[str, str] | None = None,
               plain_text: bool = False) -> Prompt:
        """`build_prompt`, tokenized with its image spans; no image is opened yet. With
        `plain_text`, special-token strings in the messages' text are encoded as ordinary text."""
        plain = self.processor.plain_text
        if plain_text:
            messages = plain.escape_messages(messages)
        text, images = self.build_prompt(messages, roles)
        ids = self.processor.prompt_ids(text, len(images), plain_text)
        return Prompt(plain.restore(text) if plain_text else text, ids, images)

    def check_room(self, prompt: Prompt, max_new_tokens: object, name: str = "max_new_tokens") -> int:
        """`max_new_tokens` (called `name` in errors), checked to fit after `prompt` in the model's
        context; the `ContextLengthError` says what to cut (the answer, images or text)."""
        context = self.model.config.language_config.max_position_embeddings
        return validation.check_length(len(prompt.ids), max_new_tokens, context, len(prompt.images),
                                       self.processor.tokens_per_image, name)

    def chat(self, messages: Messages | str, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | Sequence[str] | None = None, stream: bool = False,
             roles: tuple[str, str] | None = None) -> ChatResult | ChatStream:
        """Answer one conversation (see `janusvl.messages` for the accepted forms).

        temperature 0 is greedy; otherwise sampling with top_p / top_k (0 = off), reproducible
        under `seed`. Generation ends at EOS, at a `stop` string (cut before it) or after
        `max_new_tokens`. With stream=True, returns a `ChatStream` of text chunks."""
        run = self._run([messages], max_new_tokens, temperature, top_p, top_k, seed, stop, roles)
        if stream:
            return ChatStream(run)
        for _ in run.events():
            pass
        return run.results()[0]

    def chat_batch(self, conversations: Sequence[Messages | str], max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   seed: int | None = None, stop: str | Sequence[str] | None = None,
                   roles: tuple[str, str] | None = None) -> list[ChatResult]:
        """Answer many conversations in one left-padded batch; results in the same order."""
        if isinstance(conversations, str) or not isinstance(conversations, Sequence) or not conversations:
            raise InputError("conversations must be a non-empty list (chat_batch answers several at once)")
        run = self._run(conversations, max_new_tokens, temperature, top_p, top_k, seed, stop, roles)
        for _ in run.events():
            pass
        return run.results()

    def caption_batch(self, images: Sequence[ImageSource], prompt: str | Sequence[str] = "Describe this image.",
                      batch_size: int = 8, max_new_tokens: int = 256, **sampling: object) -> list[dict[str, object]]:
        """Answer `prompt` (one for all, or one per image) about each image through the batching
        engine, as `janusvl caption` does; one record per image, in order (see
        `janusvl.batch.CAPTION_COLUMNS`), with `error` set for an image that cannot be read."""
        from .batch import CaptionInput, Captioner

        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise InputError(f"images must be a list of images, got {type(images).__name__}")
        prompts = [prompt] * len(images) if isinstance(prompt, str) else prompt
        if isinstance(prompts, bytes) or not isinstance(prompts, Sequence):
            raise InputError(f"prompt must be a string or a list of them, got {type(prompt).__name__}")
        for i, p in enumerate(prompts):
            validation.text(f"prompt[{i}]" if p is not prompt else "prompt", p, allow_empty=False)
        if len(prompts) != len(images):
            raise InputError(f"prompt: got {len(prompts)} prompts for {len(images)} images")
        batch_size = validation.integer("batch_size", batch_size, minimum=1)
        unknown = sorted(set(sampling) - {"temperature", "top_p", "top_k", "seed", "workers"})
        if unknown:
            raise InputError(f"{unknown[0]}: caption_batch takes temperature, top_p, top_k, seed and workers")
        validation.integer("workers", sampling.get("workers", 1), minimum=1)
        ChatOptions.check(max_new_tokens, **{k: v for k, v in sampling.items() if k != "workers"})  # type: ignore[arg-type]
        rows = [CaptionInput(str(i), image, p) for i, (image, p) in enumerate(zip(images, prompts))]  # type: ignore[arg-type]
        captioner = Captioner(self, batch_size=batch_size, max_new_tokens=max_new_tokens, **sampling)  # type: ignore[arg-type]
        try:
            records = {r["id"]: r for r in captioner.stream(rows)}
        finally:
            captioner.close()
        return [records[row.id] for row in rows]

    def _run(self, batch: Sequence[Messages | str], max_new_tokens: int, temperature: float,
             top_p: float, top_k: int, seed: int | None, stop: str | Sequence[str] | None,
             roles: tuple[str, str] | None) -> _Run:
        options = ChatOptions.check(max_new_tokens, temperature, top_p, top_k, seed, stop)
        prompts = [self.prompt(messages, roles) for messages in batch]
        for prompt in prompts:  # every row fits before any image is opened
            self.check_room(prompt, options.max_new_tokens)
        return _Run(self, prompts, options)

    def generate_images(self, prompt: str, n: int = 1, cfg_weight: float = 5.0, temperature: float = 1.0,
                        seed: int | None = None, progress: bool = False) -> list[Image.Image]:
        """`n` images (384 x 384 RGB for the released models) generated from the text `prompt`,
        as DeepSeek's generation_inference.py does; see `janusvl.generation.image`."""
        from .generation.image import generate_images

        return generate_images(self.model, self.processor, prompt, n=n, cfg_weight=cfg_weight,
                               temperature=temperature, seed=seed, progress=progress, roles=self.roles)
