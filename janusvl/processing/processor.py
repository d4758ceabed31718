"""VLChatProcessor: DeepSeek's processor API (prompt -> ids with image spans, batches with masks).

Follows DeepSeek's `janus.models.processing_vlm` (spec sections 4.2-4.4) so code written against
it runs unchanged: `from_pretrained`, `process_one`, `batchify`, `__call__`, and outputs that
unpack with `**inputs`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import JanusConfig
from ..errors import ConfigError, InputError
from ..validation import text
from .image import VLMImageProcessor
from .images_io import DEFAULT_LIMITS, ImageLimits, ImageSource, open_image
from .plain_text import PlainText
from .template import DEFAULT_SYSTEM_PROMPT, SFT_FORMATS, apply_sft_template
from .tokenizer import JanusTokenizer, read_json_object

PROCESSOR_CONFIG = "processor_config.json"

Conversation = Sequence[Mapping[str, Any]]


class _DictAccess:
    """Lets outputs be unpacked with `**outputs` and read as `outputs["input_ids"]`."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


@dataclass
class VLChatProcessorOutput(_DictAccess):
    sft_format: str  # the prompt text (DeepSeek's name for it)
    input_ids: torch.Tensor  # [T] int64, image spans expanded
    pixel_values: torch.Tensor  # [n_images, 3, H, W] float32
    num_image_tokens: list[int]  # one entry per image

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class BatchedVLChatProcessorOutput(_DictAccess):
    sft_format: list[str]
    input_ids: torch.Tensor  # [B, T] left-padded with the pad id
    attention_mask: torch.Tensor  # [B, T] int64, 1 on real tokens
    pixel_values: torch.Tensor  # [B, max(1, n_images), 3, H, W], zeros where a row has no image
    images_seq_mask: torch.Tensor  # [B, T] bool, True at image placeholder positions
    images_emb_mask: torch.Tensor  # [B, max(1, n_images), num_image_tokens] bool, True for real images

    def to(
        self, device: torch.device | str, dtype: torch.dtype = torch.bfloat16
    ) -> BatchedVLChatProcessorOutput:
        """Move every tensor to `device`; cast only pixel_values to `dtype`. Returns self."""
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        self.images_seq_mask = self.images_seq_mask.to(device)
        self.images_emb_mask = self.images_emb_mask.to(device)
        self.pixel_values = self.pixel_values.to(device=device, dtype=dtype)
        return self


def image_list(images: object, where: str = "images") -> list[ImageSource]:
    """A message's or a call's images as a list; a lone string is refused, as iterating it would
    take each character for a path (DeepSeek's `"images": ["x.png"]` is a list)."""
    if images is None:
        return []
    if isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image)):
        raise InputError(f"{where} must be a list of images, got a single {type(images).__name__} "
                         f"({str(images)[:40]!r}); write [{str(images)[:40]!r}]")
    if not isinstance(images, Sequence):
        raise InputError(f"{where} must be a list of images, got {type(images).__name__}")
    return list(images)


def load_pil_images(conversations: Conversation, limits: ImageLimits | None = None) -> list[Image.Image]:
    """Every entry of each message's "images" list, in order, opened as RGB PIL images.

    Entries may be file paths, `data:image/...;base64,` URLs, raw bytes or PIL images; `limits`
    bound their size (see `ImageLimits`)."""
    if not isinstance(conversations, Sequence) or isinstance(conversations, str):
        raise InputError("conversations must be a list of messages")
    images = []
    for i, message in enumerate(conversations):
        if not isinstance(message, Mapping):
            raise InputError(f"conversations[{i}] must be a dict, got {type(message).__name__}")
        for source in image_list(message.get("images"), f"conversations[{i}]['images']"):
            images.append(open_image(source, limits))
    return images


class VLChatProcessor:
    """Builds model inputs from conversations (or a ready prompt) and images."""

    def __init__(
        self,
        image_processor: VLMImageProcessor,
        tokenizer: JanusTokenizer,
        image_tag: str = "<image_placeholder>",
        image_start_tag: str = "<begin_of_image>",
        image_end_tag: str = "<end_of_image>",
        pad_tag: str = "<｜▁pad▁｜>",
        num_image_tokens: int = 576,
        add_special_token: bool = False,
        sft_format: str = "deepseek",
        mask_prompt: bool = True,
        ignore_id: int = -100,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        image_limits: ImageLimits = DEFAULT_LIMITS,
    ) -> None:
        if add_special_token:
            # DeepSeek's code would then keep the tag token in front of each image span, which
            # gives one more image position than image embeddings. No Janus release sets it.
            raise ConfigError("processor_config.json: add_special_token true is not supported")
        if sft_format not in SFT_FORMATS:
            raise ConfigError(f"processor_config.json: unknown sft_format {sft_format!r}")
        if num_image_tokens < 1:
            raise ConfigError(f"processor_config.json: num_image_tokens must be >= 1, got {num_image_tokens}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_tag = image_tag
        self.image_start_tag = image_start_tag
        self.image_end_tag = image_end_tag
        self.pad_tag = pad_tag
        self.num_image_tokens = int(num_image_tokens)
        self.add_special_token = add_special_token
        self.sft_format = sft_format
        self.mask_prompt = mask_prompt  # training only; kept for API parity
        self.ignore_id = ignore_id  # training only; kept for API parity
        self.system_prompt = system_prompt
        self.image_limits = image_limits  # how images are opened: size caps, EXIF orientation
        # Ids differ between releases: look every tag up once, and fail now if one is missing.
        self._ids = {}
        for tag in (image_tag, image_start_tag, image_end_tag, pad_tag):
            tag_id = tokenizer.token_to_id(tag)
            if tag_id is None:
                raise ConfigError(f"tokenizer has no token {tag!r}, which the processor needs")
            self._ids[tag] = tag_id

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> VLChatProcessor:
        """Tokenizer, image processor and processor_config.json from one checkpoint directory."""
        path = Path(path)
        file = path / PROCESSOR_CONFIG
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raw = {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read {PROCESSOR_CONFIG}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: must hold a JSON object")
        keys = ("image_tag", "image_start_tag", "image_end_tag", "pad_tag", "num_image_tokens",
                "add_special_token", "sft_format", "mask_prompt", "ignore_id")
        kwargs = {k: raw[k] for k in keys if k in raw}
        kwargs.update(overrides)
        tokenizer = JanusTokenizer.from_pretrained(path)
        image_processor = VLMImageProcessor.from_pretrained(path)
        try:
            processor = cls(image_processor, tokenizer, **kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{file}: invalid value: {exc}") from None
        model_config = read_json_object(path / "config.json")
        if model_config.get("model_type") == "multi_modality":  # DeepSeek's layout: check them together
            try:
                processor.check_model(JanusConfig.from_dict(model_config))
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        return processor

    def check_model(self, config: JanusConfig) -> None:
        """Refuse a processor whose images the model described by `config` cannot take: every
        image must give exactly one embedding row per image token."""
        vision = config.vision_config
        if self.num_image_tokens != vision.num_patches:
            raise ConfigError(
                f"processor_config.json num_image_tokens {self.num_image_tokens} disagrees with the vision "
                f"tower in config.json: (image_size {vision.image_size} / patch size {vision.spec.patch_size})^2 "
                f"= {vision.num_patches} image features")
        if self.image_processor.image_size != vision.image_size:
            raise ConfigError(
                f"preprocessor_config.json image_size {self.image_processor.image_size} disagrees with "
                f"config.json vision_config.params.image_size {vision.image_size}")

    @cached_property
    def plain_text(self) -> PlainText:
        """Marks special-token strings in untrusted text so they are encoded as ordinary text."""
        return PlainText(self.tokenizer)

    @property
    def image_token(self) -> str:
        return self.image_tag

    @property
    def image_id(self) -> int:
        return self._ids[self.image_tag]

    @property
    def image_start_id(self) -> int:
        return self._ids[self.image_start_tag]

    @property
    def image_end_id(self) -> int:
        return self._ids[self.image_end_tag]

    @property
    def pad_id(self) -> int:
        return self._ids[self.pad_tag]

    def apply_sft_template_for_multi_turn_prompts(
        self, conversations: Conversation, sft_format: str = "deepseek", system_prompt: str = ""
    ) -> str:
        """The prompt text for `conversations` (DeepSeek's default here is no system prompt)."""
        return apply_sft_template(conversations, sft_format=sft_format, system_prompt=system_prompt)

    def expand_image_tokens(self, ids: list[int]) -> list[int]:
        """Replace each image tag id by begin, num_image_tokens x image tag, end (spec 4.3)."""
        span = [self.image_start_id, *[self.image_id] * self.num_image_tokens, self.image_end_id]
        out: list[int] = []
        for i in ids:
            out.extend(span if i == self.image_id else (i,))
        return out

    def process_one(
        self,
        prompt: str | None = None,
        conversations: Conversation | None = None,
        images: Sequence[ImageSource] | None = None,
        plain_text: bool = False,
        **kwargs: Any,
    ) -> VLChatProcessorOutput:
        """Inputs for one sample. Give exactly one of `prompt` (already templated) or
        `conversations`; `images` fill the image tags in order. With `plain_text`, `prompt` holds
        text escaped by `self.plain_text.escape`, whose special-token strings are encoded as
        ordinary text (see `processing.plain_text`). Extra keyword arguments are accepted and
        ignored, as DeepSeek's processor does."""
        if (prompt is None) == (conversations is None):
            raise InputError("give exactly one of prompt or conversations")
        if prompt is None:
            prompt = apply_sft_template(conversations, self.sft_format, self.system_prompt)
        if isinstance(images, (Image.Image, str, Path, bytes)):
            images = [images]
        images = image_list(images)
        ids = self.prompt_ids(prompt, len(images), plain_text)
        return self.with_images(self.plain_text.restore(prompt) if plain_text else prompt, ids, images)

    def prompt_ids(self, prompt: str, n_images: int, plain_text: bool = False) -> list[int]:
        """The ids of `prompt` with each image tag expanded (spec 4.3), checked to hold one tag
        per image. Cheap: no image is opened, so a caller can check the length first. With
        `plain_text`, `prompt` holds text escaped by `self.plain_text.escape`."""
        prompt = text("prompt", prompt)
        ids = self.plain_text.encode(prompt) if plain_text else self.tokenizer.encode(prompt)
        n_tags = ids.count(self.image_id)
        if n_tags != n_images:
            raise InputError(
                f"the prompt has {n_tags} {self.image_tag} tag(s) but {n_images} image(s) were given "
                "(load a conversation's images with load_pil_images(conversations))"
            )
        return self.expand_image_tokens(ids)

    @property
    def tokens_per_image(self) -> int:
        """Prompt tokens one image takes: its tag becomes begin, num_image_tokens tags, end."""
        return self.num_image_tokens + 2

    def with_images(self, prompt: str, ids: Sequence[int], images: Sequence[ImageSource]) -> VLChatProcessorOutput:
        """The sample for `ids` (from `prompt_ids`), its images opened (within `image_limits`)
        and preprocessed."""
        opened = [open_image(image, self.image_limits) for image in images]
        return VLChatProcessorOutput(
            sft_format=prompt,
            input_ids=torch.tensor(list(ids), dtype=torch.long),
            pixel_values=self.image_processor(opened).pixel_values,
            num_image_tokens=[self.num_image_tokens] * len(opened),
        )

    def batchify(self, outputs: Sequence[VLChatProcessorOutput]) -> BatchedVLChatProcessorOutput:
        """Left-pad a list of samples into one batch with the masks the model needs (spec 4.4)."""
        if not outputs or isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
            raise InputError("batchify needs a non-empty list of samples (from process_one)")
        for i, out in enumerate(outputs):
            if not isinstance(out, VLChatProcessorOutput):
                raise InputError(f"outputs[{i}] is a {type(out).__name__}, not a process_one output")
        B = len(outputs)
        T = max(len(o) for o in outputs)
        max_images = max(1, max(len(o.num_image_tokens) for o in outputs))
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        pixel_values = torch.zeros((B, max_images, *self.image_processor.default_shape), dtype=torch.float32)
        images_seq_mask = torch.zeros((B, T), dtype=torch.bool)
        images_emb_mask = torch.zeros((B, max_images, self.num_image_tokens), dtype=torch.bool)
        for b, out in enumerate(outputs):
            n = len(out)
            input_ids[b, T - n:] = out.input_ids
            attention_mask[b, T - n:] = 1
            images_seq_mask[b, T - n:] = out.input_ids == self.image_id
            n_images = len(out.num_image_tokens)
            if n_images:
                pixel_values[b, :n_images] = out.pixel_values
            for j, n_tokens in enumerate(out.num_image_tokens):
                images_emb_mask[b, j, :n_tokens] = True
        return BatchedVLChatProcessorOutput(
            sft_format=[o.sft_format for o in outputs],
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            images_seq_mask=images_seq_mask,
            images_emb_mask=images_emb_mask,
        )

    def __call__(
        self,
        *,
        prompt: str | None = None,
        conversations: Conversation | None = None,
        images: Sequence[ImageSource] | None = None,
        force_batchify: bool = True,
        **kwargs: Any,
    ) -> BatchedVLChatProcessorOutput | VLChatProcessorOutput:
        """`process_one`, then `batchify` into a batch of one unless force_batchify is False."""
        one = self.process_one(prompt=prompt, conversations=conversations, images=images, **kwargs)
        return self.batchify([one]) if force_batchify else one
