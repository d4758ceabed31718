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


def to_transformers(model, processor):
    """transformers' JanusForConditionalGeneration (fp32) holding `model`'s weights."""
    import transformers  # a test dependency: parity must run, never skip

    from janusvl.loading.hf_layout import to_transformers_state_dict, transformers_config_dict

    cfg = transformers.JanusConfig(**transformers_config_dict(model.config, processor.image_id))
    hf = transformers.JanusForConditionalGeneration(cfg).float().eval()
    hf.load_state_dict(to_transformers_state_dict(model.state_dict()), strict=True)
    return hf


@pytest.fixture(scope="session")
def hf_model(tiny):
    """transformers' JanusForConditionalGeneration holding our loader's weights."""
    _, processor, model = tiny
    return to_transformers(model, processor)


@pytest.fixture(scope="session")
def hf_model_bf16(hf_model):
    """transformers' Janus in bf16: our loader's weights, rounded to bf16 as our loader rounds them."""
    import copy

    return copy.deepcopy(hf_model).to(torch.bfloat16)


def hf_embeds(hf, processor, batch) -> torch.Tensor:
    """transformers' fusion: embed ids, scatter the aligned features of the real images in order."""
    ids = batch.input_ids
    embeds = hf.model.get_input_embeddings()(ids)
    real = batch.images_emb_mask.any(-1)
    if real.any():
        feats = hf.model.get_image_features(batch.pixel_values[real].to(hf.dtype)).pooler_output
        mask = (ids == processor.image_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats.reshape(-1, embeds.shape[-1]))
    return embeds


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error ||got - want|| / ||want||, in fp32."""
    want = want.float()
    return ((got.float() - want).norm() / want.norm()).item()


# What bf16 rounding allows through the tiny model: its image rows and logits land 0.7-1.5% (relative
# L2) from fp32, in janusvl and in transformers alike; a bf16-only bug (an op left in bf16 that
# should accumulate in fp32, a wrong cast) shows as several percent.
BF16_BOUND = 0.02


def assert_bf16_close(ours: torch.Tensor, theirs: torch.Tensor, fp32: torch.Tensor, bound: float) -> None:
    """`ours` (bf16) is within `bound` of the fp32 result and of transformers' bf16 result `theirs`,
    and no farther from fp32 than transformers' bf16 is (25% slack): what bf16 rounding allows."""
    ours_err, theirs_err, apart = rel_error(ours, fp32), rel_error(theirs, fp32), rel_error(ours, theirs)
    assert ours_err < bound and apart < bound and ours_err <= 1.25 * theirs_err, (ours_err, theirs_err, apart)


BF16_CONVERSATION = [{"role": "<|User|>", "content": "<image_placeholder>\nWhat is this?",
                      "images": [make_image(64, 48, seed=41)]}, {"role": "<|Assistant|>", "content": ""}]


@pytest.fixture(scope="session")
def bf16_oracle(tiny, hf_model, hf_model_bf16):
    """(inputs, {dtype: (embeddings, last-token logits)}) of transformers' Janus in fp32 and bf16
    for BF16_CONVERSATION. (transformers' bf16 vision tower takes ~8 s here: computed once.)"""
    _, processor, _ = tiny
    inputs = processor(conversations=BF16_CONVERSATION, images=BF16_CONVERSATION[0]["images"])
    out = {}
    with torch.inference_mode():
        for hf in (hf_model, hf_model_bf16):
            embeds = hf_embeds(hf, processor, inputs)
            logits = hf(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits[:, -1]
            out[hf.dtype] = (embeds, logits)
    return inputs, out


@pytest.fixture(scope="session")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose decoder has grouped-query attention: 4 heads share 2 KV heads."""
    return write_checkpoint(tmp_path_factory.mktemp("gqa") / "ckpt", dtype=torch.float32, seed=5,
                            language={"num_key_value_heads": 2})


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The hostile corpus's combined table (library, CLI, server), when this run tried any case."""
    import sys

    report = sys.modules.get("hostile_report")  # imported by the hostile suites, when they ran
    if report is not None and report.OUTCOMES:
        terminalreporter.write_sep("=", "hostile corpus: library, CLI and server")
        terminalreporter.write_line(report.table(report.OUTCOMES))
