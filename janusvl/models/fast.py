"""Fast paths for the LLaMA decoder: fused projections, pre-packed bf16 weights, int8 weights.

Decoding reads every weight once per token, so its speed is the speed of the matrix-vector
products. On CPUs, oneDNN runs bf16 products ~2.5x faster when the weight is pre-packed into its
blocked layout, and the result is bit-identical to `F.linear` (same kernel, same accumulation
order; tests/test_fast.py checks it). Fusing q/k/v and gate/up saves kernel launches per token.
int8 quantisation (one scale per output row) halves the bytes read again.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings

import torch
from torch import nn

from .layers import linear, native_bf16
from .llama import LlamaForCausalLM


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packing helps bf16 weights on CPUs with native bf16 support."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and native_bf16()


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W held in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Packed for one row: decode is where the weight layout matters (prefill is compute bound).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias,
                                               "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """Int8 weights, one scale per output row (symmetric, absmax / 127).

    Decode-sized calls (at most `DYNAMIC_MAX_ROWS` rows) on CPUs run in fbgemm's dynamic-quantised
    kernel: the activations are quantised per call to uint8 too, and the product reads a quarter
    of the fp32 bytes (~1.8x faster than packed bf16 with VNNI, ~3.7x than plain bf16 on AVX2).
    Longer calls (prefill, compute bound) and other devices multiply by the int8 weight converted
    to the activation dtype, which is exact, then apply the row scales: weight-only error.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.float()
        self.out_features, self.in_features = weight.shape
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = bias
        self.packed = None
        if weight.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
            self.packed = _fbgemm_pack(self.qweight, scale, None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.packed is not None and x2.device.type == "cpu" and x2.shape[0] <= DYNAMIC_MAX_ROWS:
            y = torch.ops.quantized.linear_dynamic(x2.float(), self.packed, not _HAS_VNNI).to(x.dtype)
        else:
            y = linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


# Rows up to which a call is memory bound (decode, batched decode, image-generation steps).
DYNAMIC_MAX_ROWS = 16


def _cpu_has_vnni() -> bool:
    """Without VNNI, fbgemm multiplies uint8 x int8 pairs into int16 sums that can saturate at
    full range; PyTorch's answer is to quantise activations to 7 bits there (reduce_range)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False  # unknown CPU: the safe, reduced range
    return "avx512_vnni" in flags or "avx_vnni" in flags


_HAS_VNNI = _cpu_has_vnni()


def _fbgemm_pack(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> object:
    with warnings.catch_warnings():  # quantised tensor constructors warn of a future deprecation
        warnings.simplefilter("ignore")
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            q = torch._make_per_channel_quantized_tensor(
                qweight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(q, bias)
        finally:
            torch.backends.quantized.engine = previous


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    return weight, (torch.cat(biases) if biases[0] is not None else None)


def optimize(lm: LlamaForCausalLM, quantize: str | None = None) -> LlamaForCausalLM:
    """Rewrite the decoder's linear layers in place for inference; returns `lm`.

    quantize=None keeps bf16 numerics exactly (fusing and packing only where it helps);
    quantize="int8" stores every decoder projection and the LM head as int8 rows + scales.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    weight = lm.lm_head.weight
    if quantize == "int8":
        make = Int8Linear
    elif can_pack(weight):
        make = PackedLinear
    else:
        return lm  # nothing faster than plain F.linear for this device and dtype
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        sources = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        attn.qkv_proj = make(*_fuse([attn.q_proj, attn.k_proj, attn.v_proj]))
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.o_proj = make(attn.o_proj.weight, attn.o_proj.bias)
        mlp.gate_up_proj = make(*_fuse([mlp.gate_proj, mlp.up_proj]))
        del mlp.gate_proj, mlp.up_proj
        mlp.down_proj = make(mlp.down_proj.weight, None)
        release_pages(*(m.weight for m in sources))
    source = lm.lm_head.weight
    lm.lm_head = make(source, None)
    if source is not lm.model.embed_tokens.weight:  # tied: the embedding still reads it
        release_pages(source)
    return lm


def release_pages(*tensors: torch.Tensor) -> None:
    """Hand back the resident pages of weights that were just repacked.

    A memory-mapped checkpoint maps each file once, for all its tensors, so the pages packing
    read would stay in this process's RSS as long as any tensor of the file lives: the old and
    the packed copy of the decoder would both count. MADV_PAGEOUT drops the old pages. It is a
    hint that never changes contents (clean file pages are read back if touched again; anonymous
    memory is only ever swapped), so it is safe whatever the tensor's memory is."""
    madvise = _madvise()
    if madvise is None:
        return
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = -(-t.data_ptr() // _PAGE) * _PAGE  # whole pages inside the tensor only
        end = (t.data_ptr() + t.numel() * t.element_size()) // _PAGE * _PAGE
        if end > start:
            madvise(start, end - start, _MADV_PAGEOUT)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_PAGEOUT = 21  # Linux 5.4+; older kernels return EINVAL, which is ignored


@functools.cache
def _madvise() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
