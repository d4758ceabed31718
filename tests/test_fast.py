"""The fast decoder paths give the plain path's results: fused projections and packed bf16
exactly, fbgemm's fp16-weight kernel as fp32 sums of the exact weights, int8 within the documented
bounds; and each CPU class gets the kernels meant for it.

CPU classes: with native bf16 (AVX-512 BF16, AMX), `optimize` fuses q/k/v and gate/up and runs
every projection in the faster (measured) of oneDNN's packed kernel and the plain one, both
bit-identical; without it (AVX2), in the faster of janusvl's AVX2 kernel and fbgemm's fp16-weight
kernel (`AvxLinear`, `HalfLinear`), prompts and
decoding alike; int8 runs fbgemm's dynamic kernel on decode-sized calls (7-bit activations without
VNNI) and int8 weights x activations on prompts. Detection is monkeypatched so every selection is
checked on every CPU; only running oneDNN's packed kernel needs the CPU. On AVX2 each of the two
kernels (janusvl's own `AvxLinear`, fbgemm's `HalfLinear`) is tested as the one chosen.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import rel_error
from janusvl import InputError, Janus, MultiModalityCausalLM, kernels
from janusvl.generation.text import decode_step, generate, prefill
from janusvl.models import fast, layers, llama, quant
from janusvl.models.fast import PackedLinear, can_pack, optimize, release_pages
from janusvl.models.kv_cache import RaggedBatch
from janusvl.models.quant import Int8Linear
from test_loading import tied_checkpoint

# Relative L2 error of int8 last-token logits vs bf16, documented in README (Performance).
INT8_PREFILL_MAX_REL_ERROR = 0.05
INT8_DECODE_MAX_REL_ERROR = 0.08
INT4_MAX_REL_ERROR = 0.4


def load(ckpt, quantize=None, fast=False):
    model = MultiModalityCausalLM.from_pretrained(ckpt, device="cpu", dtype="bfloat16")
    if fast or quantize:
        optimize(model.language_model, quantize)
    return model


def prompt(model, T: int = 40, B: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.language_config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :7] = 0  # a left-padded row
    return model.language_model.get_input_embeddings()(ids), mask


def assert_tracks_plain(plain, half) -> None:
    """A fast bf16 decoder's logits track the plain one's within fp32-vs-bf16 sums, and greedy
    decoding picks the same 12 tokens."""
    embeds, mask = prompt(plain)
    with torch.inference_mode():
        a = plain.language_model(inputs_embeds=embeds, attention_mask=mask).logits.float()
        b = half.language_model(inputs_embeds=embeds, attention_mask=mask).logits.float()
        assert rel_error(b, a) < 2e-3
        kw = dict(attention_mask=mask, eos_token_id=None, max_new_tokens=12)
        assert torch.equal(generate(plain.language_model, embeds, **kw), generate(half.language_model, embeds, **kw))


def phases(lm, embeds: torch.Tensor, mask: torch.Tensor, calls: list) -> dict[str, tuple[torch.Tensor, list]]:
    """{phase: (logits, calls recorded in it)} for a real prefill and one cached decode step."""
    B, T, _ = embeds.shape
    cache = lm.model.new_cache(B, T + 1)
    out = {}
    with torch.inference_mode():
        logits = prefill(lm, embeds, mask, cache)
        out["prefill"], calls[:] = (logits, list(calls)), []
        next_ids = torch.tensor([5, 9])[:B]  # the same token for both models, bf16 and int8
        logits = decode_step(lm, next_ids, mask.sum(-1, keepdim=True), cache)
        out["decode"], calls[:] = (logits, list(calls)), []
    return out


def record(monkeypatch, owner: object, name: str, what, calls: list | None = None) -> list:
    """Wrap owner.name so each call appends what(*args) to `calls` (a new list if None); returns it."""
    calls, real = [] if calls is None else calls, getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(what(*args))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def operand_kind(operands: list[torch.Tensor]) -> tuple:
    """What a projection's operands in the one-call decode step make it: bf16/fp16 weights, int8
    weights + row scales, or int4 weights + scales + lows (with its group size)."""
    if len(operands) == 3:
        q, scales, lows = operands
        return ("int4", q.dtype, scales.dtype, lows.dtype, 2 * q.shape[1] // scales.shape[1])
    return ("int8", *(t.dtype for t in operands)) if len(operands) == 2 else ("half", operands[0].dtype)


def record_one_call(monkeypatch) -> list:
    """Each call of the kernels' one-call decode step: (rows, [the four projections' kinds] per layer)."""
    return record(monkeypatch, kernels.load(), "decode_layers", lambda x, cos, sin, layers, *_: (
        rows(x), [tuple(operand_kind(p) for p in layer[2:]) for layer in layers]))


class UnpackedLinear(nn.Module):
    """Stands in for PackedLinear where oneDNN cannot pack bf16 (it refuses without AVX-512 or
    AVX-NE-CONVERT): the same fused weight through the plain layers."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layers.linear(x, self.weight, self.bias)


@pytest.fixture
def packing_cpu(monkeypatch) -> None:
    """A CPU with native bf16 as `optimize` sees it, with the packed kernel stood in for and
    measured fastest (as it is on such CPUs)."""
    monkeypatch.setattr(fast, "native_bf16", lambda: True)
    monkeypatch.setattr(layers, "native_bf16", lambda: True)
    monkeypatch.setattr(fast, "PackedLinear", UnpackedLinear)
    monkeypatch.setattr(fast, "_CHOSEN", {})
    monkeypatch.setattr(fast, "_decode_cost", lambda layer, weight: 0.0 if isinstance(layer, UnpackedLinear) else 1.0)


@pytest.fixture
def avx2_cpu(monkeypatch) -> None:
    """A CPU without native bf16 as every layer sees it."""
    monkeypatch.setattr(fast, "native_bf16", lambda: False)
    monkeypatch.setattr(layers, "native_bf16", lambda: False)
    monkeypatch.setattr(fast, "_CHOSEN", {})


AVX2_KERNELS = {"avx2-half": fast.AvxLinear, "fbgemm-fp16": fast.HalfLinear}


def avx2_kernel_calls(name: str) -> tuple[object, str]:
    """Where each AVX2 kernel's products go, to record them: (owner, attribute)."""
    if name == "avx2-half":
        return kernels.load(), "half_linear"
    return torch.ops.quantized, "linear_dynamic_fp16"


@pytest.fixture(params=list(AVX2_KERNELS))
def avx2_kernel(request, avx2_cpu, monkeypatch) -> str:
    """A CPU without native bf16 on which the measurement picked this kernel (each is tested)."""
    name = request.param
    if name == "avx2-half" and kernels.unavailable_reason() is not None:
        pytest.skip(f"janusvl's AVX2 kernel cannot run here: {kernels.unavailable_reason()}")
    if name == "avx2-half":
        assert kernels.load() is not None, "janusvl's AVX2 kernel did not build (see the warning)"
    monkeypatch.setattr(fast, "_decode_cost", lambda layer, weight: 0.0 if type(layer) is AVX2_KERNELS[name] else 1.0)
    return name


# --- bf16: fusion and packing --------------------------------------------------------------------

def test_fusion_is_exact_on_every_cpu(gqa_dir, packing_cpu) -> None:
    """On a native-bf16 CPU, `optimize` fuses q/k/v and gate/up and packs every projection and the
    head; the fused model computes bit for bit what the loaded one does. Grouped-query attention
    makes the k and v parts of the fused projection narrower than q."""
    plain, fused = load(gqa_dir), load(gqa_dir, fast=True)
    cfg = plain.config.language_config
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    assert q_rows == 2 * kv_rows
    for a, b in zip(plain.language_model.model.layers, fused.language_model.model.layers, strict=True):
        attn, mlp = b.self_attn, b.mlp
        assert all(isinstance(m, UnpackedLinear) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert not any(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))
        assert torch.equal(attn.qkv_proj.weight, torch.cat([a.self_attn.q_proj.weight, a.self_attn.k_proj.weight,
                                                            a.self_attn.v_proj.weight]))
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([a.mlp.gate_proj.weight, a.mlp.up_proj.weight]))
    assert isinstance(fused.language_model.lm_head, UnpackedLinear)
    embeds, mask = prompt(plain)
    with torch.inference_mode():
        a = plain.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        b = fused.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        assert torch.equal(a, b)
        kw = dict(attention_mask=mask, eos_token_id=None, max_new_tokens=12)
        assert torch.equal(generate(plain.language_model, embeds, **kw), generate(fused.language_model, embeds, **kw))


@pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)),
                    reason="runs oneDNN's packed bf16 kernel, which needs a CPU with native bf16 (AVX-512 BF16 "
                           "or AMX); test_fusion_is_exact_on_every_cpu checks the rewrite on every CPU")
def test_packed_bf16_is_bit_identical(gqa_dir) -> None:
    plain, fast_ = load(gqa_dir), load(gqa_dir, fast=True)
    assert isinstance(fast_.language_model.lm_head, PackedLinear)
    assert isinstance(fast_.language_model.model.layers[0].self_attn.qkv_proj, PackedLinear)
    embeds, mask = prompt(plain)
    with torch.inference_mode():
        a = plain.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        b = fast_.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        assert torch.equal(a, b)
        kw = dict(attention_mask=mask, eos_token_id=None, max_new_tokens=12)
        assert torch.equal(generate(plain.language_model, embeds, **kw), generate(fast_.language_model, embeds, **kw))


def test_without_native_bf16_every_projection_runs_the_chosen_kernel_in_fp32(tiny_dir, avx2_kernel, monkeypatch) -> None:
    """What `Janus.from_pretrained` gives a bf16 checkpoint on an AVX2 CPU: every decoder
    projection (fused) and the head in the kernel measured fastest (either of the two), for prompts
    and decoding alike, on fp32 activations; no bf16 product reaches torch's own kernels (scalar
    loops there)."""
    model = Janus.from_pretrained(tiny_dir, device="cpu", dtype="bfloat16").model
    lm, kind = model.language_model, AVX2_KERNELS[avx2_kernel]
    assert lm.kernel == avx2_kernel
    halves = [lm.lm_head] + [m for layer in lm.model.layers for m in (
        layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert all(type(m) is kind and m.exact for m in halves)
    generation = [model.gen_head.output_mlp_projector, model.gen_head.vision_head,
                  *[m for m in model.gen_aligner.modules() if m.__class__.__name__.endswith("Linear")]]
    assert len(generation) >= 4 and all(type(m) is kind for m in generation)
    calls = record(monkeypatch, *avx2_kernel_calls(avx2_kernel), lambda x, weight: (rows(x), x.dtype))
    plain = record(monkeypatch, F, "linear", lambda x, w, b=None: (rows(x), x.dtype))
    one_call = record_one_call(monkeypatch)
    embeds, mask = prompt(model)
    B, T, _ = embeds.shape
    seen = phases(lm, embeds, mask, calls)
    n = len(lm.model.layers)
    # prefill: 4 products a layer on B*T rows, the head on the last position; decode: B rows throughout
    assert seen["prefill"][1] == [(B * T, torch.float32)] * 4 * n + [(B, torch.float32)]
    if avx2_kernel == "avx2-half":  # the layers in the kernels' one call, on the same weights; the head
        assert one_call == [(B, [(("half", torch.bfloat16),) * 4] * n)]
        assert seen["decode"][1] == [(B, torch.float32)]
    else:  # fbgemm's layers are not the kernels' own: layer by layer
        assert one_call == []
        assert seen["decode"][1] == [(B, torch.float32)] * (4 * n + 1)
    assert plain == []


@pytest.fixture
def avx2_half(avx2_cpu, monkeypatch) -> None:
    """A CPU without native bf16 on which janusvl's AVX2 kernel was measured fastest."""
    assert kernels.unavailable_reason() is None and kernels.load() is not None, kernels.unavailable_reason()
    monkeypatch.setattr(fast, "_decode_cost", lambda layer, weight: 0.0 if type(layer) is fast.AvxLinear else 1.0)


def test_avx2_kernel_is_the_fp32_product_of_the_loaded_weights_whatever_the_batch(tiny_dir, avx2_half) -> None:
    """AvxLinear reads the loaded bf16 (and fp16) weights in place and sums in fp32: against an
    fp64 product within what fp32 sums of K terms allow. Each output is summed in one fixed order,
    so every row of a product of M rows equals, to the bit, that row multiplied alone (all row
    counts of the kernel's tiles and their remainders), unlike fbgemm's and MKL's kernels."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        weight = (torch.randn(101, 256, generator=g) * 0.05).to(dtype)  # 101: a remainder after every tile width
        layer = fast.AvxLinear(weight, None)
        assert layer.weight.data_ptr() == weight.data_ptr()  # in place: no copy, no repacking
        x = torch.randn(19, 256, generator=g)
        y = layer(x)
        exact = x.double() @ weight.double().T
        bound = weight.shape[1] * 2.0 ** -24 * (x.double().abs() @ weight.double().abs().T)
        assert ((y.double() - exact).abs() <= bound).all()
        alone = torch.cat([layer(x[i:i + 1]) for i in range(19)])
        for M in range(1, 20):
            assert torch.equal(layer(x[:M]), alone[:M]), M
        many = torch.randn(300, 256, generator=g)  # prompts: MKL's product over widened panels
        exact = many.double() @ weight.double().T
        bound = weight.shape[1] * 2.0 ** -24 * (many.double().abs() @ weight.double().abs().T)
        assert ((layer(many).double() - exact).abs() <= bound).all()
        with torch.inference_mode():  # the panels' worker threads under inference mode and not
            assert torch.equal(layer(many), layer(many.clone()))
    bias = torch.randn(101, generator=g).bfloat16()
    layer = fast.AvxLinear(weight.bfloat16(), bias)
    assert torch.equal(layer(x), (fast.AvxLinear(weight.bfloat16(), None)(x) + bias.float()))
    assert not fast.AvxLinear(torch.randn(8, 12).bfloat16(), None).exact  # K not a multiple of 8: plain layer
    plain, half = load(tiny_dir), load(tiny_dir, fast=True)
    assert half.language_model.kernel == "avx2-half"
    assert_tracks_plain(plain, half)


def test_without_native_bf16_and_the_kernels_the_kv_cache_holds_the_bf16_values_in_fp32(tiny_dir, avx2_cpu, monkeypatch) -> None:
    """Where bf16 is emulated and janusvl's kernels cannot run, a bf16 decoder's cache is fp32
    (torch's bf16 attention slows with the batch there) holding exactly the bf16-rounded keys and
    values, and decode-step attention runs in fp32; the logits match a bf16 cache's up to
    fp32-vs-bf16 attention arithmetic."""
    monkeypatch.setattr(kernels, "load", lambda: None)
    model = load(tiny_dir)
    lm = model.language_model
    embeds, mask = prompt(model)
    B, T, _ = embeds.shape
    cache = lm.model.new_cache(B, T + 1)
    assert cache.k[0].dtype == cache.v[-1].dtype == torch.float32
    with torch.inference_mode():
        prefill(lm, embeds, mask, cache)
        for t in (*cache.k, *cache.v):
            kept = t[:, :, :T]
            assert torch.equal(kept, kept.bfloat16().float())
        attention = record(monkeypatch, F, "scaled_dot_product_attention", lambda q, k, v, **_: (q.dtype, k.dtype))
        a = decode_step(lm, torch.tensor([5, 9]), mask.sum(-1, keepdim=True), cache)
        assert attention == [(torch.float32, torch.float32)] * len(lm.model.layers)
        monkeypatch.setattr(layers, "native_bf16", lambda: True)  # a bf16 cache, as on native CPUs
        half = lm.model.new_cache(B, T + 1)
        assert half.k[0].dtype == torch.bfloat16
        prefill(lm, embeds, mask, half)
        b = decode_step(lm, torch.tensor([5, 9]), mask.sum(-1, keepdim=True), half)
    assert rel_error(a, b) < 1e-2


def test_without_native_bf16_decoding_attends_through_the_kernel_over_a_bf16_cache(tiny_dir, avx2_cpu, monkeypatch) -> None:
    """With janusvl's kernels, the cache keeps bf16 (half the bytes of fp32) and each decode step's
    attention runs `decode_attention` (left padding masked), giving the fp32 cache's logits up to
    the order of fp32 sums; prompts still attend through torch in fp32. The kernel itself matches
    an fp64 reference with grouped-query heads and masks, and a row alone equals the row in a batch."""
    assert kernels.load() is not None
    model = load(tiny_dir)
    lm = model.language_model
    embeds, mask = prompt(model)
    B, T, _ = embeds.shape
    cache = lm.model.new_cache(B, T + 1)
    assert cache.k[0].dtype == torch.bfloat16
    ids = torch.tensor([5, 9])
    with torch.inference_mode():
        prefill(lm, embeds, mask, cache)
        calls = record(monkeypatch, kernels.load(), "decode_attention",
                       lambda q, k, v, valid, scale: (tuple(q.shape), None if valid is None else valid.shape))
        torch_calls = record(monkeypatch, F, "scaled_dot_product_attention", lambda q, k, v, **_: q.shape[2])
        a = decode_step(lm, ids, mask.sum(-1, keepdim=True), cache)
        assert calls == [((B, lm.config.num_attention_heads, 1, lm.config.head_dim), (B, T + 1))] * len(lm.model.layers)
        assert torch_calls == []
        monkeypatch.setattr(kernels, "load", lambda: None)  # the same model with an fp32 cache
        wide = lm.model.new_cache(B, T + 1)
        assert wide.k[0].dtype == torch.float32
        prefill(lm, embeds, mask, wide)
        b = decode_step(lm, ids, mask.sum(-1, keepdim=True), wide)
    assert rel_error(a.float(), b.float()) < 1e-3
    monkeypatch.undo()
    op = kernels.load().decode_attention
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.bfloat16, torch.float16):
        k = torch.randn(3, 2, 40, 64, generator=g).to(dtype)[:, :, :37]  # a cache's view: capacity 40, 37 used
        v = torch.randn(3, 2, 40, 64, generator=g).to(dtype)[:, :, :37]
        q = torch.randn(3, 8, 1, 64, generator=g)
        valid = torch.rand(3, 37, generator=g) > 0.3
        valid[:, -1] = True
        for m in (None, valid):
            out = op(q, k, v, m, 0.125)
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.125, enable_gqa=True,
                                                 attn_mask=None if m is None else m[:, None, None, :])
            assert (out.double() - ref).abs().max() < 1e-5
        alone = torch.cat([op(q[i:i + 1].contiguous(), k[i:i + 1], v[i:i + 1], valid[i:i + 1], 0.125) for i in range(3)])
        assert torch.equal(alone, op(q, k, v, valid, 0.125))


def test_fbgemm_decoder_is_the_fp32_product_of_the_exact_weights(tiny_dir, avx2_cpu, monkeypatch) -> None:
    """HalfLinear holds every bf16 weight exactly (checked by unpacking fbgemm's copy) and its
    products are fp32 sums of them: against an fp64 product, within what fp32 sums of K terms
    allow; the whole bf16 decoder then tracks the plain bf16 path as closely as fp32 and bf16
    rounding allow, and greedy decoding picks the same tokens."""
    monkeypatch.setattr(fast, "_decode_cost", lambda layer, weight: 0.0 if type(layer) is fast.HalfLinear else 1.0)
    plain, half = load(tiny_dir), load(tiny_dir, fast=True)
    head = half.language_model.lm_head
    weight = plain.language_model.lm_head.weight
    unpacked = torch.ops.quantized.linear_unpack_fp16(head.packed)[0]
    assert torch.equal(unpacked * head.unscale[:, None], weight.float())
    x = torch.randn(7, weight.shape[1]).to(torch.bfloat16)
    exact = x.double() @ weight.double().T
    bound = weight.shape[1] * 2.0 ** -24 * (x.double().abs() @ weight.double().abs().T)
    assert ((head(x).double() - exact).abs() <= bound + exact.abs() * 2.0 ** -8).all()  # + bf16 rounding
    assert_tracks_plain(plain, half)
    with torch.inference_mode():
        fast.optimize_generation(half.gen_head, half.gen_aligner)
        assert type(half.gen_head.vision_head) is fast.HalfLinear
        codes = torch.randint(0, plain.config.gen_vision_config.image_token_size, (4,))
        hidden = plain.prepare_gen_img_embeds(codes)
        assert rel_error(half.prepare_gen_img_embeds(codes).float(), hidden.float()) < 1e-2
        assert rel_error(half.gen_head(hidden).float(), plain.gen_head(hidden).float()) < 1e-2


def test_half_linear_knows_which_weights_fp16_holds() -> None:
    """Rows spanning more binades than fp16 holds below its top are reported inexact (then
    `optimize` keeps the plain layer); the check agrees with converting."""
    g = torch.Generator().manual_seed(0)
    for span, fits in [(10, True), (30, False)]:
        w = (torch.randn(64, 96, generator=g) * torch.exp2(-torch.rand(64, 96, generator=g) * span)).bfloat16()
        w[3] = 0  # an all-zero row
        layer = fast.HalfLinear(w, None)
        _, e = torch.frexp(w.abs().amax(1).float())
        scaled = w.float() * torch.exp2(15.0 - e)[:, None]
        assert layer.exact is fits is torch.equal(scaled.half().float(), scaled)
        assert type(fast._exact_or_plain(fast.HalfLinear, w, None)) is (fast.HalfLinear if fits else fast.PlainLinear)


def test_kernels_are_measured_once_and_the_fastest_kept(monkeypatch) -> None:
    monkeypatch.setattr(fast, "_CHOSEN", {})
    monkeypatch.setattr(fast, "can_pack", lambda w: True)
    timed = []

    def cost(layer, weight):
        timed.append(type(layer).__name__)
        return 2.0 if isinstance(layer, fast.PlainLinear) else 1.0

    monkeypatch.setattr(fast, "_decode_cost", cost)
    monkeypatch.setattr(fast, "PackedLinear", UnpackedLinear)
    w = torch.randn(32, 16).bfloat16()
    assert fast.pick_kernel(w) == ("onednn-bf16", UnpackedLinear)
    assert fast.pick_kernel(w) == ("onednn-bf16", UnpackedLinear)
    assert sorted(timed) == ["PlainLinear", "UnpackedLinear"]  # once each, for the process
    monkeypatch.setattr(fast, "_decode_cost", lambda layer, weight: 0.0 if isinstance(layer, fast.PlainLinear) else 1.0)
    monkeypatch.setattr(fast, "_CHOSEN", {})
    assert fast.pick_kernel(w)[0] == "torch"
    assert fast.pick_kernel(torch.randn(32, 16)) is None  # fp32: the loaded layers are the choice


def test_fp32_decoders_are_left_as_loaded(tiny_dir, packing_cpu) -> None:
    model = MultiModalityCausalLM.from_pretrained(tiny_dir, device="cpu", dtype="float32")
    optimize(model.language_model)
    assert type(model.language_model.lm_head) is layers.Linear
    assert model.language_model.model.layers[0].self_attn.qkv_proj is None


# --- small decoder ops in one kernel call ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_rope_is_the_plain_rope_to_the_bit(dtype) -> None:
    """The kernel's rotary embedding rounds each product and the sum as torch's half-precision
    ops do: equal to `apply_rope` bit for bit, on a strided q (a slice of a fused projection)."""
    assert kernels.load() is not None, kernels.unavailable_reason()
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 4096, (3, 5), generator=g)
    cos, sin = llama.rope_tables(positions, 64, 10000.0, dtype)
    fused = (torch.randn(3, 5, 6 * 64 + 32, generator=g) * 3).to(dtype)
    q = fused[..., 32:].view(3, 5, 6, 64)  # not contiguous: rows of the fused projection
    got = kernels.load().rope(q, cos, sin)
    assert got.is_contiguous() and torch.equal(got.transpose(1, 2), llama.apply_rope(q.transpose(1, 2), cos, sin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_rms_norm_tracks_the_plain_norm_and_is_row_invariant(dtype) -> None:
    """The kernel's RMSNorm sums squares in another order than torch: within one rounding of
    the plain norm (identical on most values), and a row's result does not depend on its batch."""
    assert kernels.load() is not None, kernels.unavailable_reason()
    g = torch.Generator().manual_seed(2)
    norm = llama.RMSNorm(96, 1e-6)
    norm.weight.data = (torch.randn(96, generator=g) * 0.3 + 1).to(dtype)
    x = (torch.randn(4, 7, 96, generator=g) * 2).to(dtype)
    with torch.no_grad():
        plain = norm(x)
        norm.kernel = kernels.load()
        fused = norm(x)
        alone = torch.stack([norm(x[i:i + 1])[0] for i in range(4)])
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((fused.float() - plain.float()).abs() <= plain.float().abs() * ulp + 1e-6).all()
    assert (fused == plain).float().mean() > 0.99
    assert torch.equal(fused, alone)


def test_small_ops_are_fused_only_where_bf16_is_emulated(tiny_dir, monkeypatch) -> None:
    """AVX2 (emulated bf16): every RMSNorm and attention layer of an optimised decoder runs the
    fused kernels, and the decoder tracks the plain one; native bf16 keeps torch's ops."""
    for native in (False, True):
        monkeypatch.setattr(layers, "native_bf16", lambda native=native: native)
        model = load(tiny_dir, fast=True)
        fused = [m.kernel is not None for m in model.language_model.modules()
                 if isinstance(m, (llama.RMSNorm, llama.Attention))]
        assert len(fused) == 3 * len(model.language_model.model.layers) + 1
        assert all(fused) if not native else not any(fused)
        if not native:
            assert_tracks_plain(load(tiny_dir), model)


@pytest.mark.parametrize("checkpoint", ["tiny_dir", "gqa_dir"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_decode_step_in_one_call_is_the_layer_by_layer_step_to_the_bit(request, checkpoint, quantize, avx2_half,
                                                                       monkeypatch) -> None:
    """Where janusvl's kernels run the decoder (AVX2), a decode step runs every layer in one kernel
    call (`decode_layers`): its logits and the keys and values it stores equal, to the bit, the
    layer-by-layer step's (the same kernels called one at a time from Python), for bf16, int8 and
    int4 weights, plain and grouped-query heads, a left-padded batch, and a ragged batch of caches
    at different lengths (the serving engine's continuous batch)."""
    monkeypatch.setattr(quant, "native_bf16", lambda: False)
    model = load(request.getfixturevalue(checkpoint), quantize=quantize, fast=True)
    lm = model.language_model
    assert lm.kernel == {None: "avx2-half", "int8": "int8-avx2", "int4": "int4-avx2"}[quantize]
    embeds, mask = prompt(model)
    B, T, _ = embeds.shape
    steps = torch.tensor([[5, 9], [17, 2], [3, 3]])
    one_call = record(monkeypatch, kernels.load(), "decode_layers", lambda x, *_: rows(x))

    def written(cache) -> list[torch.Tensor]:
        return [t[:, :, :cache.length] for t in cache.k + cache.v]

    def padded_batch() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cache = lm.model.new_cache(B, T + len(steps))
        with torch.inference_mode():
            out = [prefill(lm, embeds, mask, cache)]
            for i, ids in enumerate(steps):
                out.append(decode_step(lm, ids, mask.sum(-1, keepdim=True) + i, cache))
        return out, written(cache)

    def ragged_batch() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        first, second = lm.model.new_cache(1, T + len(steps)), lm.model.new_cache(1, T + len(steps))
        out = []
        with torch.inference_mode():
            lm(inputs_embeds=embeds[:1], past_key_values=first)
            lm(inputs_embeds=embeds[1:, 7:], past_key_values=second)  # row 1's real tokens: 7 fewer
            for ids in steps:
                x = lm.get_input_embeddings()(ids)[:, None]
                out.append(lm.model(inputs_embeds=x, past_key_values=RaggedBatch([first, second])).last_hidden_state)
        return out, written(first) + written(second)

    for run in (padded_batch, ragged_batch):
        with monkeypatch.context() as layer_by_layer:
            layer_by_layer.setattr(llama.LlamaModel, "_decode_in_one_call", lambda *_: None)
            expected, expected_kv = run()
        assert one_call == []
        got, got_kv = run()
        assert one_call == [B] * len(steps)
        one_call.clear()
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), run.__name__
        assert all(torch.equal(a, b) for a, b in zip(got_kv, expected_kv, strict=True)), run.__name__


def test_each_torch_installation_builds_the_kernels_in_its_own_directory(monkeypatch) -> None:
    """torch's builder rebuilds when a directory's recorded include paths change: two virtualenvs
    must not share (and rebuild in turn) one build directory."""
    here = kernels.build_directory()
    assert here == kernels.build_directory()  # stable for one installation
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/site-packages/torch/__init__.py")
    assert kernels.build_directory().parent == here.parent and kernels.build_directory() != here


def test_float32_models_never_build_the_kernels(tiny_dir, monkeypatch) -> None:
    """Building the kernels takes about a minute on first use: a float32 model, which none of them
    serves, loads and answers without asking for them."""
    asked = record(monkeypatch, kernels, "load", lambda: "load")
    model = Janus.from_pretrained(tiny_dir, device="cpu", dtype="float32").model
    embeds, mask = prompt(model)
    with torch.inference_mode():
        generate(model.language_model, embeds, attention_mask=mask, eos_token_id=None, max_new_tokens=2)
    assert model.language_model.kernel == "torch" and asked == []


# --- int8 ----------------------------------------------------------------------------------------

@pytest.fixture(params=["avx2", "fbgemm"])
def int8_path(request, monkeypatch) -> str:
    """Each CPU class's int8 kernel: janusvl's AVX2 kernel where bf16 is emulated, fbgemm's
    dynamic kernel where it is native (the detection is monkeypatched, both run on any x86)."""
    if request.param == "avx2":
        if kernels.unavailable_reason() is not None:
            pytest.skip(f"janusvl's AVX2 kernel cannot run here: {kernels.unavailable_reason()}")
        monkeypatch.setattr(quant, "native_bf16", lambda: False)
    else:
        monkeypatch.setattr(quant, "native_bf16", lambda: True)
    return request.param


def test_int8_phases_use_their_kernels_within_documented_error(tiny_dir, monkeypatch, int8_path) -> None:
    """AVX2: every product (prompts, decode steps, the head) runs janusvl's int8 kernel on the
    stored int8 weights, nothing packed. Native bf16: prompts multiply int8 weights
    x bf16 activations (the head, on one row a sequence, takes the dynamic kernel) and each decode
    step runs every projection in fbgemm's dynamic kernel. Either way a real prefill and a real
    cached decode step stay within the README's bounds of bf16."""
    plain, q = load(tiny_dir), load(tiny_dir, quantize="int8")
    lm = q.language_model
    assert lm.model.layers[1].mlp.down_proj.qweight.dtype == torch.int8
    assert lm.kernel == ("int8-avx2" if int8_path == "avx2" else "int8-fbgemm")
    embeds, mask = prompt(plain)
    B, T, _ = embeds.shape
    reference = phases(plain.language_model, embeds, mask, [])
    n = len(lm.model.layers)
    if int8_path == "avx2":
        assert all(m.packed is None and m.kernel is not None for m in lm.modules() if isinstance(m, Int8Linear))
        calls = record(monkeypatch, kernels.load(), "int8_linear", lambda x, w, s: (rows(x), x.dtype, w.dtype))
        one_call = record_one_call(monkeypatch)
        seen = phases(lm, embeds, mask, calls)
        assert seen["prefill"][1] == [(B * T, torch.float32, torch.int8)] * 4 * n + [(B, torch.float32, torch.int8)]
        # decode: the layers in the kernels' one call on the same int8 operands, then the head
        assert one_call == [(B, [(("int8", torch.int8, torch.float32),) * 4] * n)]
        assert seen["decode"][1] == [(B, torch.float32, torch.int8)]
    else:
        calls = record(monkeypatch, quant, "linear", lambda x, w, b=None: ("int8 weights", rows(x), x.dtype))
        record(monkeypatch, torch.ops.quantized, "linear_dynamic",
               lambda x, packed, reduce_range: ("dynamic", rows(x), reduce_range), calls)
        seen = phases(lm, embeds, mask, calls)
        seven_bit = not quant._HAS_VNNI
        # qkv, o, gate_up, down per layer, then the head
        assert seen["prefill"][1] == [("int8 weights", B * T, torch.bfloat16)] * 4 * n + [("dynamic", B, seven_bit)]
        assert seen["decode"][1] == [("dynamic", B, seven_bit)] * (4 * n + 1)
    for phase, bound in (("prefill", INT8_PREFILL_MAX_REL_ERROR), ("decode", INT8_DECODE_MAX_REL_ERROR)):
        error = rel_error(seen[phase][0], reference[phase][0])
        print(f"\nint8 ({int8_path}) vs bf16 last-token logits, {phase}, relative L2 error: {error:.4f}")
        assert 0 < error < bound, phase  # 0 would mean nothing was quantised


def quantized_rows(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as the integer kernels quantise it, computed here independently: each block of
    `block` values as int8 round(x * 127 / absmax) (ties to even) with scale absmax / 127."""
    M, K = x.shape
    xb = x.float().view(M, K // block, block)
    top = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    return torch.round(xb * inv).clamp(-127, 127), top / 127.0  # [M, K/block, block], [M, K/block, 1]


def assert_batch_invariant(layer, x: torch.Tensor) -> None:
    """Every row of a batch (up to x's rows) equals the same row computed alone, to the bit."""
    alone = torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])])
    assert all(torch.equal(layer(x[:M]), alone[:M]) for M in range(1, x.shape[0] + 1))


def test_int8_avx2_kernel_is_the_integer_product_of_quantised_activations(monkeypatch) -> None:
    """Up to 128 rows the AVX2 int8 layer computes the sum over blocks of 32 of x's block scale
    times the exact integer dot product of x's int8 block with the stored int8 weights, times the
    row scale (checked against that sum computed here in float64, within the kernel's fp32
    rounding), and a batched row equals the row alone. More rows (prompts) are the fp32 product
    of x with the stored weights (weight-only error). The stored int8 tensor is read in place."""
    assert kernels.load() is not None, kernels.unavailable_reason()
    monkeypatch.setattr(quant, "native_bf16", lambda: False)
    g = torch.Generator().manual_seed(4)
    K = 256
    w, bias = torch.randn(101, K, generator=g).bfloat16(), torch.randn(101, generator=g).bfloat16()
    layer = Int8Linear.from_weight(w, bias)
    assert layer.kernel is not None and layer.packed is None
    x = torch.randn(19, K, generator=g)
    x[3, 64:96] = 0  # an all-zero block
    x[5, 7] = 300.0  # an outlier: its block's other values lose precision, no other block does
    q, scale = layer.qweight.double(), layer.scale.double()
    qx, sx = quantized_rows(x, 32)
    dots = torch.einsum("mbk,nbk->mnb", qx.double(), q.view(101, K // 32, 32))  # exact integers
    scaled = dots * sx.double().view(19, 1, K // 32)
    exact = scaled.sum(-1) * scale + bias.double()
    bound = (K // 32) * 2.0 ** -23 * scaled.abs().sum(-1) * scale + exact.abs() * 2.0 ** -22
    assert ((layer(x).double() - exact).abs() <= bound + 1e-6).all()
    weight_only = (x.double() @ q.T) * scale + bias.double()
    plain_rows = [i for i in range(19) if i != 5]  # the activations' quantisation error, no outlier
    assert rel_error(layer(x).double()[plain_rows], weight_only[plain_rows]) < 1e-2
    assert_batch_invariant(layer, x)
    prompt_rows = torch.randn(130, K, generator=g)  # more than 128 rows: fp32 product, weight-only
    wide = (prompt_rows.double() @ q.T) * scale + bias.double()
    assert ((layer(prompt_rows).double() - wide).abs()
            <= 1e-4 * (prompt_rows.double().abs() @ q.abs().T) * scale + 1e-6).all()


def test_int4_avx2_kernel_is_the_integer_product_of_quantised_activations() -> None:
    """Up to 128 rows the int4 layer computes, per group, x's group scale times the stored group
    scale times the exact integer dot product of x's int8 group with the 4-bit values, plus the
    group's low value times the exact sum of x over the group, plus the group scale times 8 times
    that sum's quantisation error (so the error meets q - 8, centred; checked against those sums
    computed here in float64); a batched row equals the row alone; more rows are the fp32
    product with the dequantised weights. Both group sizes (32 and 64 values)."""
    assert kernels.load() is not None, kernels.unavailable_reason()
    g = torch.Generator().manual_seed(5)
    for N, K in [(37, 160), (70, 256)]:
        layer = quant.Int4Linear.from_weight(torch.randn(N, K, generator=g).bfloat16(), None)
        G = layer.group_size
        assert layer.kernel is not None and G == (32 if K == 160 else 64)
        x = torch.randn(19, K, generator=g)
        x[2, 5] = -250.0
        values = quant.unpack_int4(layer.qweight).double().view(N, K // G, G)
        qx, sx = quantized_rows(x, G)
        dots = torch.einsum("mgk,ngk->mng", qx.double(), values)
        scaled = dots * sx.double().view(19, 1, K // G) * layer.scales.double()
        sums = x.double().view(19, K // G, G).sum(-1)
        error = 8 * (sums - sx.double().view(19, K // G) * qx.double().sum(-1))
        rest = sums @ layer.lows.double().T + error @ layer.scales.double().T
        exact = scaled.sum(-1) + rest
        bound = (K // G) * 2.0 ** -22 * (scaled.abs().sum(-1) + rest.abs()) + exact.abs() * 2.0 ** -22
        assert ((layer(x).double() - exact).abs() <= bound + 1e-5).all(), (N, K)
        plain_rows = [i for i in range(19) if i != 2]  # the activations' quantisation error, no outlier
        assert rel_error(layer(x).double()[plain_rows], (x.double() @ layer.dequantized().double().T)[plain_rows]) < 1e-2
        assert_batch_invariant(layer, x)
        prompt_rows = torch.randn(130, K, generator=g)
        d = layer.dequantized().double()
        assert ((layer(prompt_rows).double() - prompt_rows.double() @ d.T).abs()
                <= 1e-4 * (prompt_rows.double().abs() @ d.abs().T) + 1e-6).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_integer_kernels_carry_non_finite_activations_to_their_rows(bad: float, monkeypatch) -> None:
    """A row holding inf or NaN comes out NaN from both integer kernels (a float product would be
    non-finite too), never as finite values; the other rows are untouched."""
    assert kernels.load() is not None, kernels.unavailable_reason()
    monkeypatch.setattr(quant, "native_bf16", lambda: False)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(24, 128, generator=g)
    x = torch.randn(3, 128, generator=g)
    for layer in (Int8Linear.from_weight(w, None), quant.Int4Linear.from_weight(w, None)):
        clean = layer(x)
        x_bad = x.clone()
        x_bad[1, 77] = bad
        out = layer(x_bad)
        assert out[1].isnan().all() and torch.equal(out[[0, 2]], clean[[0, 2]])


def test_int4_runs_torch_int4_kernel_where_janusvl_kernels_are_not_built(tiny_dir, monkeypatch) -> None:
    """Without janusvl's kernels the same stored int4 values run torch's int4 kernel on a copy
    repacked at load: the fp32 product with the dequantised weights (no activation quantising)."""
    monkeypatch.setattr(quant.kernels, "load", lambda: None)
    g = torch.Generator().manual_seed(6)
    layer = quant.Int4Linear.from_weight(torch.randn(48, 128, generator=g).bfloat16(), None)
    assert layer.kernel is None and layer.torch_packed is not None
    x = torch.randn(3, 128, generator=g)
    assert rel_error(layer(x).double(), x.double() @ layer.dequantized().double().T) < 1e-5
    q = load(tiny_dir, quantize="int4")
    assert q.language_model.kernel == "int4-torch"
    embeds, mask = prompt(q)
    assert torch.isfinite(q.language_model(inputs_embeds=embeds, attention_mask=mask).logits).all()


def test_int4_phases_use_the_int4_kernel_within_documented_error(tiny_dir, monkeypatch) -> None:
    """Every projection and the head run janusvl's int4 kernel on the stored operands, prompts and
    decode steps alike; a real prefill and cached decode step stay within the README's bounds."""
    assert kernels.load() is not None, kernels.unavailable_reason()
    plain, q = load(tiny_dir), load(tiny_dir, quantize="int4")
    assert q.language_model.kernel == "int4-avx2"
    embeds, mask = prompt(plain)
    B, T, _ = embeds.shape
    reference = phases(plain.language_model, embeds, mask, [])
    calls = record(monkeypatch, kernels.load(), "int4_linear",
                   lambda x, w, scales, lows: (rows(x), x.dtype, x.shape[1] // scales.shape[1]))
    one_call = record_one_call(monkeypatch)
    seen = phases(q.language_model, embeds, mask, calls)
    n, D = len(q.language_model.model.layers), plain.config.language_config.hidden_size
    groups = [64, 64, 64, quant.int4_group_size(plain.config.language_config.intermediate_size)] * n + [64]
    assert D % 64 == 0
    assert seen["prefill"][1] == [(B * T, torch.float32, g) for g in groups[:-1]] + [(B, torch.float32, 64)]
    # decode: the layers in the kernels' one call on the same int4 operands, then the head
    int4 = ("int4", torch.uint8, torch.bfloat16, torch.bfloat16)
    assert one_call == [(B, [tuple((*int4, g) for g in groups[:4])] * n)]
    assert seen["decode"][1] == [(B, torch.float32, 64)]
    for phase in ("prefill", "decode"):
        error = rel_error(seen[phase][0], reference[phase][0])
        print(f"\nint4 vs bf16 last-token logits, {phase}, relative L2 error: {error:.4f}")
        assert 0 < error < INT4_MAX_REL_ERROR, phase


def test_int4_weights_are_within_half_a_step_of_the_originals() -> None:
    """Each weight's dequantised value is within half a quantisation step of the original (steps
    per group), up to the bf16 rounding of the group's low value and step; the nibbles pack and
    unpack losslessly."""
    g = torch.Generator().manual_seed(0)
    for N, K in [(96, 160), (160, 64)]:
        w = (torch.randn(N, K, generator=g) * 0.02).bfloat16()
        layer = quant.Int4Linear.from_weight(w, None)
        G = layer.group_size
        assert G == (32 if K == 160 else 64) and layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == N * K // 2
        values = quant.unpack_int4(layer.qweight)
        assert values.max() <= 15 and torch.equal(quant.pack_int4(values), layer.qweight)
        d = layer.dequantized()
        step, low = (t.float().repeat_interleave(G, dim=1) for t in (layer.scales, layer.lows))  # [N, K]
        assert ((d - w.float()).abs() <= step / 2 + (low.abs() + 15 * step) * 2.0 ** -8).all()
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.Int4Linear.from_weight(torch.randn(8, 48), None)


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_activations_are_7_bit_only_without_vnni(monkeypatch, vnni: bool) -> None:
    monkeypatch.setattr(quant, "_HAS_VNNI", vnni)
    monkeypatch.setattr(quant, "native_bf16", lambda: True)  # where fbgemm's dynamic kernel runs
    layer = Int8Linear.from_weight(torch.randn(32, 16).to(torch.bfloat16), None)
    dynamic = record(monkeypatch, torch.ops.quantized, "linear_dynamic", lambda x, packed, reduce_range: reduce_range)
    layer(torch.randn(2, 16).to(torch.bfloat16))
    assert dynamic == [not vnni]


@pytest.mark.parametrize("flags,vnni", [("fpu avx2 avx512f avx512_vnni", True), ("fpu avx2 avx_vnni", True),
                                        ("fpu avx2 fma", False), (None, False)])
def test_vnni_is_read_from_cpuinfo(monkeypatch, flags: str | None, vnni: bool) -> None:
    import io

    def fake_open(path, *args, **kwargs):
        assert path == "/proc/cpuinfo"
        if flags is None:
            raise OSError("no /proc here")
        return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")

    monkeypatch.setattr(quant, "open", fake_open, raising=False)
    assert quant._cpu_has_vnni() is vnni


def test_int8_linear_dequantises_to_the_weight() -> None:
    w = torch.randn(64, 32).to(torch.bfloat16)
    layer = Int8Linear.from_weight(w, None)
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


def test_janus_from_pretrained_quantizes_and_rejects_unknown_schemes(tiny_dir, tiny) -> None:
    janus = Janus.from_pretrained(tiny_dir, device="cpu", dtype="bfloat16", quantize="int8")
    lm = janus.model.language_model
    assert isinstance(lm.lm_head, Int8Linear) and isinstance(lm.model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert janus.model.dtype == torch.bfloat16  # only the decoder's linear weights are int8
    by_hand = Janus(load(tiny_dir, quantize="int8"), tiny[1])
    assert janus.chat("Describe.", max_new_tokens=8) == by_hand.chat("Describe.", max_new_tokens=8)
    plain = Janus.from_pretrained(tiny_dir, device="cpu", dtype="bfloat16", quantize="none")
    assert not isinstance(plain.model.language_model.lm_head, Int8Linear)
    assert not plain.model.language_model.kernel.startswith("int8")
    with pytest.raises(InputError, match="quantize must be None, 'int8' or 'int4', got 'int2'"):
        Janus.from_pretrained(tiny_dir, quantize="int2")
    four = Janus.from_pretrained(tiny_dir, device="cpu", dtype="bfloat16", quantize="int4")
    assert four.model.language_model.kernel == "int4-avx2"
    assert isinstance(four.model.language_model.model.layers[0].mlp.down_proj, quant.Int4Linear)
    assert four.chat("Describe.", max_new_tokens=8).completion_tokens == 8


def test_optimize_rejects_unknown_quantisation(tiny_dir) -> None:
    with pytest.raises(ValueError, match="'int2'"):
        load(tiny_dir, quantize="int2")


# --- tied embeddings -----------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [None, "int8"])
def test_optimize_keeps_tied_embeddings(tiny_dir, tmp_path, monkeypatch, packing_cpu, quantize) -> None:
    """A tied head is rewritten from the embedding, which stays as loaded and is never paged out."""
    ckpt = tied_checkpoint(tiny_dir, tmp_path / "tied")
    plain, model = load(ckpt), load(ckpt)
    embed = model.language_model.model.embed_tokens.weight
    before = embed.clone()
    released = record(monkeypatch, fast, "release_pages", lambda *tensors: [t.data_ptr() for t in tensors])
    optimize(model.language_model, quantize)
    head = model.language_model.lm_head
    assert model.language_model.model.embed_tokens.weight is embed and torch.equal(embed, before)
    assert embed.data_ptr() not in [ptr for call in released for ptr in call] and len(released) == 2
    embeds, mask = prompt(plain)
    with torch.inference_mode():
        a = plain.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        b = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
    if quantize is None:
        assert head.weight is embed and torch.equal(a, b)
    else:
        dequantised = head.qweight.float() * head.scale[:, None]
        assert ((dequantised - embed.float()).abs() <= head.scale[:, None] / 2 + 1e-6).all()
        assert 0 < rel_error(b, a) < INT8_PREFILL_MAX_REL_ERROR


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

