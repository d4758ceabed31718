"""Processing: images, tokenizer, chat template, and the VLChatProcessor that combines them."""

from .image import ImageProcessorOutput, VLMImageProcessor
from .images_io import ImageSource, open_image
from .processor import (
    BatchedVLChatProcessorOutput,
    VLChatProcessor,
    VLChatProcessorOutput,
    load_pil_images,
)
from .template import DEFAULT_SYSTEM_PROMPT, apply_sft_template
from .tokenizer import JanusTokenizer

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "BatchedVLChatProcessorOutput",
    "ImageProcessorOutput",
    "ImageSource",
    "JanusTokenizer",
    "VLChatProcessor",
    "VLChatProcessorOutput",
    "VLMImageProcessor",
    "apply_sft_template",
    "load_pil_images",
    "open_image",
]
