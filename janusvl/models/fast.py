"""Fast paths for the LLaMA decoder: fused projections, kernels picked per CPU, int8 weights.

Decoding reads every weight once per token, so its speed is the speed of the matrix-vector
products. Fusing q/k/v and gate/up saves kernel launches per token. Which kernel then runs the
products depends on the CPU, and is measured once per process (`pick_kernel`):

- With native bf16 (AVX-512 BF16, AMX): oneDNN's packed bf16 product, ~2.5x faster than plain
  `F.linear` for one row and bit-identical to it (same kernel, same accumulation order).
- Without it (AVX2): torch's bf16 product is a fast matrix-vector loop for one row but a scalar
  loop for 2 or more (a 2048x5632 product with 8 rows at 2.6 GB/s, one row at 15.6), and prompts
  paid for widening every weight to fp32 per call. Two kernels compute in fp32 on the exact
  weights for any number of rows: janusvl's own (`AvxLinear`, `janusvl.kernels`: reads the
  loaded weights in place, each output summed in one order whatever the batch) and fbgemm's
  fp16-weight kernel (`HalfLinear`: a repacked fp16 copy of every weight); the faster is kept.

int8 quantisation (one scale per output row) halves the bytes read again.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .. import kernels
from .layers import Linear, emulated, linear, native_bf16
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


class HalfLinear(nn.Module):
    """y = x W^T (+ b) in fp32 arithmetic, W held as fp16 in fbgemm's packed layout.

    Exact weights: a bf16 value has 8 significant bits and fp16 11, so every weight of a row is an
    fp16 value once the row is scaled by a power of two that puts its largest entry just under
    fp16's top (checked at construction; `exact` says so). Scaling by a power of two commutes
    exactly with fp32 products and sums, so after unscaling the output is the fp32 product of the
    checkpoint's own weights rounded to the activation dtype: what a native bf16 kernel computes,
    up to the order of the sums."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        _, exponent = torch.frexp(weight.abs().amax(dim=1).float())  # row max < 2**exponent
        shift = (15 - exponent).clamp(-100, 100).float()  # row max * 2**shift < 2**15 < 65504
        self.exact = _fits_fp16(weight, shift)
        w = weight.float().mul_(torch.exp2(shift)[:, None])
        with warnings.catch_warnings():  # fbgemm warns when it saturates; `exact` already says whether it would
            warnings.simplefilter("ignore")
            self.packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        self.register_buffer("unscale", torch.exp2(-shift))
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).float(), self.packed)
        y.mul_(self.unscale)  # exact: a power of two per output
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class AvxLinear(nn.Module):
    """y = x W^T (+ b) in fp32 arithmetic by janusvl's own AVX2 kernel (`janusvl.kernels`), W the
    loaded bf16/fp16 weight itself: no copy, no repacking. Each output is summed in the same order
    whatever the number of rows, so a batched row equals the row alone."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kernel = kernels.load()
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach().float()
        self.exact = self.weight.stride(1) == 1 and self.in_features % 8 == 0  # what the kernel takes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel.half_linear(x.reshape(-1, self.in_features).float().contiguous(), self.weight)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def _fits_fp16(weight: torch.Tensor, shift: torch.Tensor) -> bool:
    """Whether every weight * 2**shift (per row; the largest under 2**15) is an fp16 value.
    A bf16 value v has 8 significant bits: its last one is worth ulp(v) = 2**(floor(log2|v|) - 7),
    and fp16 holds every multiple of 2**-24 below its top, so v fits when |v| >= 2**-17 once
    scaled (or v is 0). Other dtypes are checked by converting."""
    if weight.dtype != torch.bfloat16:
        w = weight.float() * torch.exp2(shift)[:, None]
        return bool(torch.equal(w.half().float(), w))
    smallest = torch.exp2(-17 - shift).to(torch.bfloat16)[:, None]  # powers of two: exact in bf16
    return bool(((weight.abs() >= smallest) | (weight == 0)).all())


def has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


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


class Int4Linear(nn.Module):
    """Int4 weights in groups of `group_size` along the input dimension, each group with its own
    scale and offset (asymmetric: w ~ (q - 8) * scale + zero, q in 0..15, scale and zero in bf16),
    run by torch's int4 kernel (`_weight_int4pack_mm_for_cpu`), which unpacks on the fly and
    computes in fp32: a quarter of bf16's bytes per weight, plus 4 bytes per group."""

    GROUP_SIZES = (64, 32, 128)  # the first that divides the input width (64: 0.5 + 0.0625 B/weight)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = N, K = weight.shape
        self.group_size = G = int4_group_size(K)
        w = weight.detach().float().view(N, K // G, G)
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-10).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()  # the value q = 8 stands for
        q = ((w - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.int32).view(N, K)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # [N, K/2] uint8
        # [K/G, N, 2]: the kernel's layout of per-group (scale, zero)
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                             .to(torch.bfloat16))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, [N, K] in fp32 (for tests and error figures)."""
        eye = torch.eye(self.in_features)  # fp32 in and out: no rounding of the weights
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size,
                                                          self.scales_and_zeros.float()).T


def int4_group_size(in_features: int) -> int:
    for G in Int4Linear.GROUP_SIZES:
        if in_features % G == 0:
            return G
    raise ValueError(f"int4 needs an input width divisible by 32, got {in_features}")


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


class PlainLinear(nn.Module):
    """The loaded weight through `layers.linear` (fused where `optimize` fuses)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def kernel_candidates(weight: torch.Tensor) -> dict[str, type[nn.Module]]:
    """The kernels that may run `weight` on this CPU, in order of preference (janusvl's own AVX2
    kernel first: it reads the weights in place and is batch-invariant), none with a scalar
    fallback, none changing the model's results beyond the order of fp32 sums. Where bf16 is
    native, only the bit-identical ones: parity with DeepSeek's pipeline holds there to the bit."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return {}
    if can_pack(weight):
        return {"onednn-bf16": PackedLinear, "torch": PlainLinear}
    candidates: dict[str, type[nn.Module]] = {}
    if emulated(weight) and kernels.load() is not None:
        candidates["avx2-half"] = AvxLinear
    if emulated(weight) and has_fbgemm():
        candidates["fbgemm-fp16"] = HalfLinear
    return candidates


PREFERENCE_MARGIN = 1.15

# Kernel names chosen in this process, by (dtype, candidates): measured once, reused for every model.
_CHOSEN: dict[tuple[torch.dtype, tuple[str, ...]], str] = {}


def pick_kernel(weight: torch.Tensor) -> tuple[str, type[nn.Module]] | None:
    """The fastest candidate for decode-sized products (1 and 8 rows) of a weight of this model,
    timed once per process; None when the loaded layers are already the right choice."""
    candidates = kernel_candidates(weight)
    if not candidates:
        return None
    key = (weight.dtype, tuple(candidates))
    if key not in _CHOSEN:
        if len(candidates) == 1:
            _CHOSEN[key] = next(iter(candidates))
        else:
            costs = {name: _decode_cost(kind(weight, None), weight) for name, kind in candidates.items()}
            # In order of preference: a later candidate must be clearly faster to replace an
            # earlier one (timing noise must not swap kernels between runs).
            best = next(iter(costs))
            for name, cost in costs.items():
                if cost < costs[best] / PREFERENCE_MARGIN:
                    best = name
            _CHOSEN[key] = best
    name = _CHOSEN[key]
    return name, candidates[name]


def _decode_cost(layer: nn.Module, weight: torch.Tensor) -> float:
    """Seconds for one product of 1 row plus one of 8 rows (best of three)."""
    best = float("inf")
    x = torch.randn(8, weight.shape[1]).to(weight.dtype)
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            layer(x[:1])
            layer(x)
            best = min(best, time.perf_counter() - start)
    return best


def _exact_or_plain(kind: type[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """`kind` over the weight, or the plain layer for the rare weight fp16 cannot hold exactly
    (a row spanning more than fp16's range): results never change for speed."""
    layer = kind(weight, bias)
    return layer if getattr(layer, "exact", True) else PlainLinear(weight, bias)


QUANTIZE = (None, "int8", "int4")


def optimize(lm: LlamaForCausalLM, quantize: str | None = None) -> LlamaForCausalLM:
    """Rewrite the decoder's linear layers in place for inference; returns `lm`.

    quantize=None keeps the weights as loaded: q/k/v and gate/up are fused and every projection
    runs in the kernel `pick_kernel` measured fastest for this CPU (bit-identical to the plain
    path where bf16 is native; fp32 sums of the exact weights where it is emulated);
    quantize="int8" stores every decoder projection and the LM head as int8 rows + scales;
    quantize="int4" as int4 groups + scales and offsets.
    The choice is recorded in `lm.kernel`.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    if quantize == "int8":
        lm.kernel, make = "int8-fbgemm" if has_fbgemm() else "int8", Int8Linear
    elif quantize == "int4":
        lm.kernel, make = "int4", Int4Linear
    else:
        sample = lm.model.layers[0].mlp.gate_proj.weight if len(lm.model.layers) else lm.lm_head.weight
        picked = pick_kernel(sample)
        if picked is None:
            lm.kernel = "torch"
            return lm  # nothing faster than plain F.linear for this device and dtype
        lm.kernel, kind = picked
        make = functools.partial(_exact_or_plain, kind)
    release = lm.kernel not in ("torch", "avx2-half")  # these read the loaded weights themselves

    def rewrite(layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        fused = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]  # copied by _fuse
        kept = [attn.o_proj, mlp.down_proj]  # read in place by the plain kernel
        attn.qkv_proj = make(*_fuse([attn.q_proj, attn.k_proj, attn.v_proj]))
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.o_proj = make(attn.o_proj.weight, attn.o_proj.bias)
        mlp.gate_up_proj = make(*_fuse([mlp.gate_proj, mlp.up_proj]))
        del mlp.gate_proj, mlp.up_proj
        mlp.down_proj = make(mlp.down_proj.weight, None)
        release_pages(*(m.weight for m in fused + (kept if release else [])))

    def rewrite_head() -> None:
        source = lm.lm_head.weight
        lm.lm_head = make(source, None)
        if release and source is not lm.model.embed_tokens.weight:  # tied: the embedding still reads it
            release_pages(source)

    # Packing is single-threaded inside fbgemm and oneDNN and releases the GIL: layers in parallel.
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for done in [pool.submit(rewrite_head)] + [pool.submit(rewrite, layer) for layer in lm.model.layers]:
            done.result()
    return lm


def optimize_generation(gen_head: nn.Module, gen_aligner: nn.Module) -> None:
    """Run the image-generation head and aligner (2n rows every step of an n-image batch) in
    the kernel `pick_kernel` chose for this CPU; their weights stay as loaded in value."""
    for parent in (gen_head, gen_aligner):
        for owner in list(parent.modules()):
            for name, child in list(owner.named_children()):
                if type(child) in (nn.Linear, Linear) and (picked := pick_kernel(child.weight)) is not None:
                    setattr(owner, name, _exact_or_plain(picked[1], child.weight, child.bias))


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
