"""DeepSeek's VLMImageProcessor: resize the long side to 384, pad to a grey square, normalise.

Bit-exact with DeepSeek's code (spec section 4.1). transformers' `JanusImageProcessorPil` gives the
same pixels except that it rounds the resized short side where DeepSeek truncates it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, ImageLoadError, InputError
from .images_io import to_rgb

PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass
class ImageProcessorOutput:
    pixel_values: torch.Tensor  # [n, 3, image_size, image_size] float32

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class VLMImageProcessor:
    """Turns PIL images into the [n, 3, S, S] float32 tensor the SigLIP tower reads."""

    def __init__(
        self,
        image_size: int = 384,
        min_size: int = 14,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1.0 / 255.0,
        do_normalize: bool = True,
    ) -> None:
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ConfigError(f"image_mean and image_std need 3 values, got {image_mean} and {image_std}")
        if image_size < 1 or min_size < 1:
            raise ConfigError(f"image_size and min_size must be positive, got {image_size}, {min_size}")
        self.image_size = int(image_size)
        self.min_size = int(min_size)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        # DeepSeek pads with the mean colour, truncated to an int: 0.5 -> 127, not 128.
        self.background_color = tuple(int(m * 255) for m in self.image_mean)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VLMImageProcessor:
        """Read `preprocessor_config.json` from a checkpoint directory; defaults when it is absent."""
        file = Path(path) / PREPROCESSOR_CONFIG
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read {PREPROCESSOR_CONFIG}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: must hold a JSON object")
        keys = ("image_size", "min_size", "image_mean", "image_std", "rescale_factor", "do_normalize")
        try:
            return cls(**{k: raw[k] for k in keys if k in raw})
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{file}: invalid value: {exc}") from None

    @property
    def default_shape(self) -> list[int]:
        return [3, self.image_size, self.image_size]

    def resize(self, image: Image.Image) -> np.ndarray:
        """Resize the long side to image_size (bicubic), centre on a square canvas; uint8 [3, S, S]."""
        image = image if image.mode == "RGB" else to_rgb(image)  # resize copies: no need to twice
        width, height = image.size
        longest = max(width, height)
        # Division first, then int(): DeepSeek truncates, where transformers rounds.
        new_h = max(int(height / longest * self.image_size), self.min_size)
        new_w = max(int(width / longest * self.image_size), self.min_size)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if new_w != new_h:
            side = max(new_w, new_h)
            canvas = Image.new("RGB", (side, side), self.background_color)
            offset = (0, (new_w - new_h) // 2) if new_w > new_h else ((new_h - new_w) // 2, 0)
            canvas.paste(image, offset)
            image = canvas
        return np.asarray(image).transpose(2, 0, 1)  # [H, W, 3] -> [3, H, W]

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 -> float32 in the order DeepSeek uses: x * rescale (in float64), then (x - mean) / std."""
        x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.array(self.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return x

    def preprocess(self, images: Sequence[Image.Image] | Image.Image) -> ImageProcessorOutput:
        """[n, 3, image_size, image_size] float32 pixel values for a list of PIL images."""
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, Sequence):
            raise InputError(f"images must be a PIL image or a list of them, got {type(images).__name__}")
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise InputError(f"images[{i}] is a {type(image).__name__}, not a PIL image")
            if image.width < 1 or image.height < 1:  # DeepSeek's resize would divide by zero
                raise ImageLoadError(f"images[{i}]: the image is empty ({image.width}x{image.height} pixels)")
        arrays = [self.normalize(self.resize(image)) for image in images]
        if not arrays:
            return ImageProcessorOutput(torch.zeros(0, *self.default_shape))
        return ImageProcessorOutput(torch.from_numpy(np.stack(arrays)))

    def __call__(
        self, images: Sequence[Image.Image] | Image.Image, return_tensors: str = "pt"
    ) -> ImageProcessorOutput:
        if return_tensors != "pt":
            raise InputError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        return self.preprocess(images)
