"""The layers that keep bf16 usable on CPUs without native bf16: where bf16 is emulated, the
compute-bound calls run in fp32 and round back; elsewhere they are exactly torch's layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import BF16_BOUND, assert_bf16_close, rel_error
from janusvl import MultiModalityCausalLM
from janusvl.models import layers


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(layers, "native_bf16", lambda: False)


def bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_emulated_calls_compute_in_fp32(no_native_bf16) -> None:
    lin = layers.Linear(64, 48).to(torch.bfloat16)
    x = bf16(3, 40, 64)
    assert torch.equal(lin(x), F.linear(x.float(), lin.weight.float(), lin.bias.float()).bfloat16())
    conv = layers.Conv2d(8, 16, 3, padding=1).to(torch.bfloat16)
    img = bf16(2, 8, 12, 12, seed=1)
    assert torch.equal(conv(img), F.conv2d(img.float(), conv.weight.float(), conv.bias.float(), padding=1).bfloat16())
    q, k, v = bf16(1, 2, 30, 16, seed=2), bf16(1, 2, 30, 16, seed=3), bf16(1, 2, 30, 16, seed=4)
    mask = torch.tril(torch.ones(30, 30, dtype=torch.bool))
    assert torch.equal(layers.attention(q, k, v, attn_mask=mask),
                       F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16())
    a, b = bf16(2, 20, 16, seed=5), bf16(2, 16, 24, seed=6)
    assert torch.equal(layers.bmm(a, b), torch.bmm(a.float(), b.float()).bfloat16())
    # decode-sized products stay bf16: memory bound, half the bytes
    small = bf16(1, 2, 64, seed=7)
    assert torch.equal(lin(small), F.linear(small, lin.weight, lin.bias))


def test_layers_are_torch_layers_elsewhere() -> None:
    lin = layers.Linear(64, 48)
    x = torch.randn(5, 64)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    if layers.native_bf16():
        lin16, x16 = lin.to(torch.bfloat16), x.to(torch.bfloat16)
        assert torch.equal(lin16(x16), F.linear(x16, lin16.weight, lin16.bias))
    assert not layers.emulated(x)


def test_emulated_bf16_model_tracks_fp32(tiny_dir, bf16_oracle, no_native_bf16) -> None:
    """The pipeline in bf16 through the emulated paths (forced here, on every CPU) is as close to
    fp32 as transformers' Janus in bf16 is; decoded pixels stay within bf16 rounding of fp32."""
    inputs, hf = bf16_oracle
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = MultiModalityCausalLM.from_pretrained(tiny_dir, device="cpu", dtype=dtype)
        with torch.inference_mode():
            embeds = model.prepare_inputs_embeds(**inputs)
            logits = model.language_model(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits[:, -1]
            codes = torch.randint(0, model.config.gen_vision_config.image_token_size, (1, 36),
                                  generator=torch.Generator().manual_seed(0))
            pixels = model.gen_vision_model.decode_code(codes, shape=[1, 8, 6, 6])  # a 96 x 96 image
        out[dtype] = (embeds, logits, pixels)
    (embeds, logits, pixels), (fp32_embeds, _, fp32_pixels) = out[torch.bfloat16], out[torch.float32]
    assert embeds.dtype == logits.dtype == pixels.dtype == torch.bfloat16
    image = inputs.images_seq_mask
    (hf_embeds, hf_logits), (hf32_embeds, hf32_logits) = hf[torch.bfloat16], hf[torch.float32]
    assert_bf16_close(embeds[image], hf_embeds[image], hf32_embeds[image], BF16_BOUND)
    assert_bf16_close(logits, hf_logits, hf32_logits, BF16_BOUND)
    # ~40 conv/norm layers in bf16 put decoded pixels 3.0% from fp32, as transformers' bf16 VQ
    # decoder is (tests/test_vq.py compares the two); a real error gives far more.
    assert rel_error(pixels, fp32_pixels) < 0.04
