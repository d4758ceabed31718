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


@pytest.fixture(scope="session")
def janus(tiny):
    """The high-level API over the session's tiny model (nothing in it mutates the model)."""
    from janusvl import Janus

    _, processor, model = tiny
    return Janus(model, processor)


EOS_PROMPT = "Describe."
EOS_STEP = 5


@pytest.fixture(scope="session")
def eos_model(tiny):
    """(model, base_ids): a copy of the tiny model that answers EOS_PROMPT with EOS at step
    EOS_STEP, and the greedy ids the original model gives for that prompt.

    The copy's lm_head row for EOS is 1.5 x the row of the token the original emits at EOS_STEP,
    so EOS outranks that token there; tests check it fires there and not earlier."""
    import copy

    tokenizer, processor, model = tiny
    conv = [{"role": "<|User|>", "content": EOS_PROMPT}, {"role": "<|Assistant|>", "content": ""}]
    batch = processor(conversations=conv)
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**batch)
        base = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, eos_token_id=tokenizer.eos_token_id,
            max_new_tokens=24, min_new_tokens=24, do_sample=False)[0].tolist()
    biased = copy.deepcopy(model)
    weight = biased.language_model.lm_head.weight
    with torch.no_grad():
        weight[tokenizer.eos_token_id] = 1.5 * weight[base[EOS_STEP]]
    return biased, base
