"""Shared fixtures: tiny random checkpoints written by janusvl.testing, and transformers' Janus
loaded with the same weights after they pass through our loader (the independent oracle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janusvl import load_pretrained_model
from janusvl.testing.checkpoint import write_checkpoint


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic image with structure (gradients) and texture (noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1)], axis=-1)
    noise = rng.integers(-40, 40, size=base.shape)
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        img.putalpha(alpha)
        return img
    return img.convert(mode)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Janus-Pro-layout checkpoint, fp32 weights in one model.safetensors."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", dtype=torch.float32, seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    """(tokenizer, processor, model) loaded by janusvl in fp32 on CPU."""
    return load_pretrained_model(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_model(tiny):
    """transformers' JanusForConditionalGeneration holding our loader's weights."""
    import transformers  # a test dependency: parity must run, never skip

    from janusvl.loading.hf_layout import to_transformers_state_dict, transformers_config_dict

    _, processor, model = tiny
    cfg = transformers.JanusConfig(**transformers_config_dict(model.config, processor.image_id))
    hf = transformers.JanusForConditionalGeneration(cfg).float().eval()
    hf.load_state_dict(to_transformers_state_dict(model.state_dict()), strict=True)
    return hf
