"""The fast decoder paths give the plain path's results: packed bf16 exactly, int8 within bounds."""

from __future__ import annotations

import sys

import pytest
import torch

from janusvl import MultiModalityCausalLM
from janusvl.generation.text import generate
from janusvl.models.fast import DYNAMIC_MAX_ROWS, Int8Linear, PackedLinear, can_pack, optimize, release_pages

# Relative L2 error of int8 last-token logits vs bf16, documented in README (Performance).
INT8_PREFILL_MAX_REL_ERROR = 0.05
INT8_DECODE_MAX_REL_ERROR = 0.08


def load(tiny_dir, quantize=None, fast=False):
    model = MultiModalityCausalLM.from_pretrained(tiny_dir, device="cpu", dtype="bfloat16")
    if fast or quantize:
        optimize(model.language_model, quantize)
    return model


def prompt(model, T: int = 40, B: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.language_config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :7] = 0  # a left-padded row
    return model.language_model.get_input_embeddings()(ids), mask


@pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="CPU without bf16 oneDNN")
def test_packed_bf16_is_bit_identical(tiny_dir) -> None:
    plain, fast = load(tiny_dir), load(tiny_dir, fast=True)
    assert isinstance(fast.language_model.lm_head, PackedLinear)
    assert fast.language_model.model.layers[0].self_attn.qkv_proj is not None
    embeds, mask = prompt(plain)
    with torch.inference_mode():
        a = plain.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        b = fast.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        assert torch.equal(a, b)
        kw = dict(attention_mask=mask, eos_token_id=None, max_new_tokens=12)
        assert torch.equal(generate(plain.language_model, embeds, **kw), generate(fast.language_model, embeds, **kw))


@pytest.mark.parametrize("T, path, bound", [
    (40, "prefill: int8 weights x bf16 activations", INT8_PREFILL_MAX_REL_ERROR),
    (8, "decode-sized: fbgemm dynamic (activations quantised too)", INT8_DECODE_MAX_REL_ERROR),
])
def test_int8_logits_within_documented_error(tiny_dir, T, path, bound) -> None:
    plain, q = load(tiny_dir), load(tiny_dir, quantize="int8")
    assert isinstance(q.language_model.lm_head, Int8Linear)
    assert q.language_model.model.layers[1].mlp.down_proj.qweight.dtype == torch.int8
    embeds, mask = prompt(plain, T=T)
    assert (embeds.shape[0] * T <= DYNAMIC_MAX_ROWS) == path.startswith("decode")
    with torch.inference_mode():
        a = plain.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].float()
        b = q.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].float()
    rel = ((a - b).norm() / a.norm()).item()
    print(f"\nint8 vs bf16 last-token logits, {path}, relative L2 error: {rel:.4f}")
    assert 0 < rel < bound  # 0 would mean nothing was quantised


def test_int8_generation_runs_both_paths(tiny_dir) -> None:
    plain, q = load(tiny_dir), load(tiny_dir, quantize="int8")
    embeds, mask = prompt(plain)
    kw = dict(attention_mask=mask, eos_token_id=None, max_new_tokens=12)
    a, b = generate(plain.language_model, embeds, **kw), generate(q.language_model, embeds, **kw)
    assert a.shape == b.shape == (2, 12)
    # random tiny weights give flat logits, so greedy choices may part; most still agree
    assert (a == b).float().mean().item() > 0.5


def test_int8_linear_dequantises_to_the_weight() -> None:
    w = torch.randn(64, 32).to(torch.bfloat16)
    layer = Int8Linear(w, None)
    x = torch.randn(3, 32).to(torch.bfloat16)
    dequantised = layer.qweight.float() * layer.scale.float()[:, None]
    assert ((dequantised - w.float()).abs() <= layer.scale.float()[:, None] / 2 + 1e-6).all()
    ref = x.float() @ dequantised.t()
    # activations are quantised per call too (uint8, dynamic range), so the product is approximate
    got = layer(x).float()
    assert got.dtype == torch.float32 and layer(x).dtype == torch.bfloat16
    assert ((got - ref).norm() / ref.norm()).item() < 0.03
    # every row uses its full int8 range: the scale is absmax / 127
    assert torch.equal(layer.qweight.abs().amax(1), torch.full((64,), 127, dtype=torch.int8))


def test_optimize_rejects_unknown_quantisation(tiny_dir) -> None:
    with pytest.raises(ValueError, match="int4"):
        load(tiny_dir, quantize="int4")


def mapped_rss_mb(path) -> float:
    """Resident MB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_release_pages_drops_mapped_pages_and_keeps_contents(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(4096, 4096).to(torch.bfloat16), "b": torch.randn(16, 16)}, str(path))
    with safe_open(str(path), "pt", device="cpu") as f:
        a, b = f.get_tensor("a"), f.get_tensor("b")
    total = a.float().sum()  # touches every page of a
    assert mapped_rss_mb(path) > 30
    release_pages(a)
    assert mapped_rss_mb(path) < 2
    assert torch.equal(a.float().sum(), total)  # read back from the file
    anon = torch.randn(1024, 1024)
    copy = anon.clone()
    release_pages(anon, b, torch.empty(0))  # anonymous memory and tiny tensors: untouched
    assert torch.equal(anon, copy)

