"""Quantised decoder weights: int8 rows (janusvl's AVX2 kernel or fbgemm's dynamic one) and int4
groups (janusvl's AVX2 kernel, or torch's int4 kernel where it cannot be built).

Decoding reads every weight once per token, so bytes per weight set its speed: int8 halves bf16's,
int4 quarters it. `janusvl.models.fast.optimize(lm, quantize=...)` puts these layers in place of
the decoder's projections and head; this module holds the layers, the quantisation arithmetic and
the CPU checks they depend on.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import kernels
from .layers import fp32_product, linear, native_bf16

SCHEMES = ("int8", "int4")


def has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """Int8 weights, one scale per output row (symmetric, absmax / 127).

    On CPUs without native bf16 every call runs janusvl's AVX2 kernel (`int8_linear`,
    janusvl/kernels/int_linear.cpp) on the stored int8 weights in place, nothing packed at load
    (a pre-quantised checkpoint stays memory-mapped): up to 128 rows (decoding) by integer dot
    products, the activations quantised per call to int8 in blocks of 32 values with an fp32
    scale each; more rows (prompts) by fp32 products of weight panels widened in cache
    (weight-only error). Otherwise decode-sized calls (at most `DYNAMIC_MAX_ROWS` rows) on CPUs
    run in fbgemm's dynamic-quantised kernel (activations quantised per call to uint8, one scale
    per call; ~1.8x faster than packed bf16 with VNNI). Longer calls (prefill, compute bound) and
    other devices multiply by the int8 weight converted to the activation dtype, which is exact,
    then apply the row scales: weight-only error.

    Built from the stored form (`qweight` int8 [N, K], `scale` fp32 [N]), which is what a
    pre-quantised checkpoint holds; `from_weight` quantises. fbgemm's packed copy cannot be saved,
    so it is made here from `qweight` either way.
    """

    STORED = ("qweight", "scale")  # the constructor's tensors, as a checkpoint names them

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.packed, self.kernel = None, None
        if qweight.device.type == "cpu" and int8_in_place(qweight.shape[1]):
            self.kernel = kernels.load()  # reads qweight where it is: nothing to pack
        elif qweight.device.type == "cpu" and has_fbgemm():
            self.packed = _fbgemm_pack(qweight, scale, None if bias is None else bias.float())

    def step_operands(self) -> list[torch.Tensor] | None:
        """What the kernels' one-call decode step multiplies by (janusvl.models.llama)."""
        return [self.qweight, self.scale] if self.kernel is not None and self.bias is None else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls(*quantize_int8(weight), bias)

    @staticmethod
    def stored(N: int, K: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{name: (shape, dtype)} of the tensors an [N, K] weight is stored as."""
        return {"qweight": ((N, K), torch.int8), "scale": ((N,), torch.float32)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.device.type == "cpu":
            return fp32_product(x, self.out_features, lambda x2: self.kernel.int8_linear(x2, self.qweight, self.scale),
                                self.bias)
        x2 = x.reshape(-1, self.in_features)
        if self.packed is not None and x2.device.type == "cpu" and x2.shape[0] <= DYNAMIC_MAX_ROWS:
            y = torch.ops.quantized.linear_dynamic(x2.float(), self.packed, not _HAS_VNNI).to(x.dtype)
        else:
            y = linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 [N, K], scale fp32 [N]): w ~ qweight * scale, scale = row absmax / 127."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int4Linear(nn.Module):
    """Int4 weights in groups of `group_size` (64, or 32 where the input width is not a multiple
    of 64) along the input dimension: w ~ q * scale + low, q in 0..15, scale and low in bf16 per
    group (asymmetric: 0.5 bytes per weight plus 4 per group).

    Stored form (what a pre-quantised checkpoint holds, independent of the CPU): `qweight` uint8
    [N, K/2], two values a byte (in each block of 32 inputs, byte j holds value j in its low
    nibble and value j + 16 in its high one), `scales` and `lows` bf16 [N, K/G].

    Where janusvl's kernels are built (AVX2), every call runs `int4_linear` on the stored tensors
    in place: up to 128 rows (decoding) by integer dot products with the activations quantised
    per group to int8 (see janusvl/kernels/int_linear.cpp), more rows (prompts) by fp32 products
    of weight panels widened in cache (weight-only error). Elsewhere torch's int4 kernel
    (`_weight_int4pack_mm_for_cpu`, fp32 activations) on a copy repacked in its layout at load.
    """

    GROUP_SIZES = (64, 32)  # the first that divides the input width
    STORED = ("qweight", "scales", "lows")  # the constructor's tensors, as a checkpoint names them

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], 2 * qweight.shape[1]
        self.group_size = self.in_features // scales.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("lows", lows)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.kernel = kernels.load() if qweight.device.type == "cpu" else None
        self.torch_packed = None
        if self.kernel is None:
            self.torch_packed = _torch_int4_operands(qweight, scales, lows)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        return cls(*quantize_int4(weight), bias)

    @staticmethod
    def stored(N: int, K: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{name: (shape, dtype)} of the tensors an [N, K] weight is stored as."""
        groups = K // int4_group_size(K)
        return {"qweight": ((N, K // 2), torch.uint8), "scales": ((N, groups), torch.bfloat16),
                "lows": ((N, groups), torch.bfloat16)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_product(x, self.out_features, self._product, self.bias)

    def step_operands(self) -> list[torch.Tensor] | None:
        """What the kernels' one-call decode step multiplies by (janusvl.models.llama)."""
        return [self.qweight, self.scales, self.lows] if self.kernel is not None and self.bias is None else None

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.int4_linear(x2, self.qweight, self.scales, self.lows)
        packed, scales_and_zeros = self.torch_packed
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scales_and_zeros)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] in fp32 that the stored values stand for (tests, error figures)."""
        G = self.group_size
        q = unpack_int4(self.qweight).float()
        return q * self.scales.float().repeat_interleave(G, 1) + self.lows.float().repeat_interleave(G, 1)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, scales, lows) of `weight` [N, K] in groups of `int4_group_size(K)`: each group's
    range split in 15 steps, scale = (max - min) / 15 and low = min, both rounded to bf16."""
    N, K = weight.shape
    G = int4_group_size(K)
    w = weight.detach().float().view(N, K // G, G)
    low = w.amin(-1).to(torch.bfloat16)
    scale = ((w.amax(-1) - low.float()) / 15).clamp(min=1e-10).to(torch.bfloat16)
    q = ((w - low.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, K)), scale, low


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] of values 0..15 [N, K]: in each block of 32, byte j = q[j] | q[j + 16] << 4."""
    N, K = q.shape
    blocks = q.to(torch.uint8).view(N, K // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The values 0..15 [N, K] (uint8) of `pack_int4`'s bytes."""
    N, half = packed.shape
    blocks = packed.view(N, half // 16, 1, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], 2).reshape(N, 2 * half)


def _torch_int4_operands(qweight: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same weights in torch's int4 kernel's operands (its packing is CPU-specific, so it is
    made here): w = (q - 8) * scale + zero, zero = low + 8 * scale, in fp32."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise RuntimeError(f"int4 needs janusvl's CPU kernels or torch's int4 kernel (torch >= 2.6); "
                           f"neither is available here (torch {torch.__version__})")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(qweight).to(torch.int32), 1)
    scale, low = scales.float(), lows.float()
    return packed, torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous()


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


def int8_in_place(in_features: int) -> bool:
    """Whether int8 layers run janusvl's AVX2 kernel on the stored int8 weights (CPUs without
    native bf16, where it is built; input widths that are multiples of 32): nothing packed at
    load. Elsewhere fbgemm's dynamic kernel (VNNI where the CPU has it)."""
    return not native_bf16() and in_features % 32 == 0 and kernels.load() is not None


def quantized_kernel(scheme: str) -> str:
    """The name `lm.kernel` records for a decoder quantised to `scheme`."""
    if scheme == "int8" and int8_in_place(32):
        return "int8-avx2"
    if scheme == "int4":
        return "int4-avx2" if kernels.load() is not None else "int4-torch"
    return "int8-fbgemm" if has_fbgemm() else "int8"


QUANTIZERS: dict[str, type[Int8Linear] | type[Int4Linear]] = {"int8": Int8Linear, "int4": Int4Linear}
