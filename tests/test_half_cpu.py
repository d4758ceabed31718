"""float16 on CPUs without native fp16 (DeepSeek's demos run CPUs in float16): the compute-bound
calls take the same fp32 path as emulated bf16, never torch's scalar fp16 kernels."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from janusvl import AutoModelForCausalLM, VLChatProcessor
from janusvl.models import layers


@pytest.fixture
def no_native_half(monkeypatch):
    monkeypatch.setattr(layers, "native_fp16", lambda: False)
    monkeypatch.setattr(layers, "native_bf16", lambda: False)


def half(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half()


def test_fp16_products_convolutions_and_attention_run_in_fp32(no_native_half) -> None:
    lin = layers.Linear(64, 48).half()
    x = half(3, 40, 64, seed=0)
    want = {
        "linear": F.linear(x.float(), lin.weight.float(), lin.bias.float()).half(),
        "decode-sized linear": F.linear(x[:1, :2], lin.weight, lin.bias),  # memory bound: stays fp16
    }
    got = {"linear": lin(x), "decode-sized linear": lin(x[:1, :2])}
    conv = layers.Conv2d(8, 16, 3, padding=1).half()
    img = half(2, 8, 12, 12, seed=1)
    got["conv"] = conv(img)
    want["conv"] = F.conv2d(img.float(), conv.weight.float(), conv.bias.float(), padding=1).half()
    q, k, v = half(1, 2, 30, 16, seed=2), half(1, 2, 30, 16, seed=3), half(1, 2, 30, 16, seed=4)
    got["attention"] = layers.attention(q, k, v, is_causal=True)
    want["attention"] = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).half()
    a, b = half(2, 20, 16, seed=5), half(2, 16, 24, seed=6)
    got["bmm"], want["bmm"] = layers.bmm(a, b), torch.bmm(a.float(), b.float()).half()
    for name in want:
        assert got[name].dtype == torch.float16, name
        assert torch.equal(got[name], want[name]), name


def test_fp16_is_torchs_own_where_it_is_native(monkeypatch) -> None:
    monkeypatch.setattr(layers, "native_fp16", lambda: True)
    x = half(4, 40, 8, seed=7)
    assert not layers.emulated(x) and layers.emulated(x.bfloat16()) == (not layers.native_bf16())
    assert not layers.emulated(x.float())


def test_fp16_convolution_is_not_torchs_scalar_kernel() -> None:
    """On this kind of CPU (no AVX-512 FP16) torch's own fp16 convolution runs scalar loops: the
    VQ decoder's 128-channel 3x3 convolutions took ~10 s each at 96x96. Through janusvl's layer
    it costs what fp32 does, within a generous factor."""
    if layers.native_fp16():
        pytest.skip("this CPU has native fp16: torch's own kernel is used")
    conv = layers.Conv2d(128, 128, 3, padding=1)
    x = torch.randn(1, 128, 48, 48)
    with torch.inference_mode():
        timings = {}
        for dtype in (torch.float32, torch.float16):
            conv16, x16 = conv.to(dtype), x.to(dtype)
            conv16(x16)
            start = time.perf_counter()
            conv16(x16)
            timings[dtype] = time.perf_counter() - start
    assert timings[torch.float16] < 20 * timings[torch.float32] + 0.5, timings


def test_fp16_pipeline_tracks_fp32(tiny_dir, no_native_half) -> None:
    """DeepSeek's CPU demo path: loaded in float32, cast with `.to(torch.float16)`; embeddings,
    last-token logits and decoded pixels stay within fp16 rounding of fp32."""
    from conftest import make_image

    processor = VLChatProcessor.from_pretrained(tiny_dir)
    conv = [{"role": "<|User|>", "content": "<image_placeholder>\nWhat is this?"}, {"role": "<|Assistant|>", "content": ""}]
    inputs = processor(conversations=conv, images=[make_image(64, 48)])
    codes = torch.randint(0, 16384, (1, 576), generator=torch.Generator().manual_seed(0))
    out = {}
    for dtype in (torch.float32, torch.float16):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True).to(dtype)
        with torch.inference_mode():
            embeds = model.prepare_inputs_embeds(**inputs.to("cpu", dtype=dtype))
            logits = model.language_model(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits[:, -1]
            pixels = model.gen_vision_model.decode_code(codes, shape=[1, 8, 24, 24])
        out[dtype] = {"embeddings": embeds.float(), "logits": logits.float(), "pixels": pixels.float()}
    for name, a in out[torch.float32].items():
        b = out[torch.float16][name]
        assert torch.isfinite(b).all(), name
        rel = ((a - b).norm() / a.norm()).item()
        assert 0 < rel < 0.01, (name, rel)  # bf16 is held to 0.03; fp16 keeps 3 more mantissa bits
