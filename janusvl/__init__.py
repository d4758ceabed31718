"""janusvl: run DeepSeek's Janus models (Janus-1.3B, Janus-Pro-1B, Janus-Pro-7B).

DeepSeek's API is kept, so their scripts run after changing only the imports:
`load_pretrained_model`, `VLChatProcessor`, `MultiModalityCausalLM`, `load_pil_images`, and
transformers' `AutoModelForCausalLM` and `AutoConfig` as DeepSeek's scripts call them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .auto import AutoConfig, AutoModelForCausalLM
from .config import JanusConfig
from .errors import (CheckpointError, CheckpointNotFoundError, ConfigError, ContextLengthError, ImageLoadError,
                     ImageTooLargeError, InputError, JanusError)
from .models.janus import MultiModalityCausalLM
from .processing import JanusTokenizer, VLChatProcessor, load_pil_images

__version__ = "0.1.0"


def load_pretrained_model(
    model_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> tuple[JanusTokenizer, VLChatProcessor, MultiModalityCausalLM]:
    """DeepSeek's loader: `(tokenizer, vl_chat_processor, vl_gpt)` from a directory or Hub id.
    `device` None picks cuda, then mps, then cpu; `dtype` None is bfloat16, as DeepSeek's loader
    casts the model to (`vl_gpt.to(torch.bfloat16).cuda()`), "auto" the checkpoint's dtype.
    Weights holding NaN or infinity are refused unless `allow_nonfinite=True`."""
    from .loading.checkpoint import load_model
    from .loading.hub import resolve_checkpoint

    root = resolve_checkpoint(model_path)
    processor = VLChatProcessor.from_pretrained(root)
    model = load_model(root, device=device, dtype=torch.bfloat16 if dtype is None else dtype,
                       allow_nonfinite=allow_nonfinite)
    return processor.tokenizer, processor, model


def __getattr__(name: str) -> object:
    # The high-level API pulls in generation code; import it on first use.
    if name == "Janus":
        from .api import Janus

        return Janus
    raise AttributeError(f"module 'janusvl' has no attribute {name!r}")


__all__ = ["Janus", "AutoConfig", "AutoModelForCausalLM", "JanusConfig", "MultiModalityCausalLM", "VLChatProcessor", "JanusTokenizer",
           "load_pretrained_model", "load_pil_images", "JanusError", "ConfigError",
           "CheckpointError", "CheckpointNotFoundError", "ImageLoadError", "ImageTooLargeError", "InputError",
           "ContextLengthError"]
