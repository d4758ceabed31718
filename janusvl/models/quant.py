"""Quantised decoder weights: int8 rows (janusvl's AVX2 kernel or fbgemm's dynamic one) and int4
groups (torch's int4 kernel).

Decoding reads every weight once per token, so bytes per weight set its speed: int8 halves bf16's,
int4 quarters it. `janusvl.models.fast.optimize(lm, quantize=...)` puts these layers in place of
the decoder's projections and head; this module holds the layers, the quantisation arithmetic and
the CPU checks they depend on.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
from torch import nn

from .. import kernels
from .layers import linear, native_bf16

SCHEMES = ("int8", "int4")


def has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """Int8 weights, one scale per output row (symmetric, absmax / 127).

    On CPUs without native bf16 every call runs janusvl's AVX2 kernel on the stored int8 weights
    (`janusvl.kernels`): widened to fp32 in registers, fp32 activations, the row scales applied
    to the fp32 sums: weight-only error, and nothing to pack at load (a pre-quantised checkpoint
    stays memory-mapped). Otherwise decode-sized calls (at most `DYNAMIC_MAX_ROWS` rows) on CPUs run in fbgemm's dynamic-quantised
    kernel: the activations are quantised per call to uint8 too, and the product reads a quarter
    of the fp32 bytes (~1.8x faster than packed bf16 with VNNI, ~3.7x than plain bf16 on AVX2).
    Longer calls (prefill, compute bound) and other devices multiply by the int8 weight converted
    to the activation dtype, which is exact, then apply the row scales: weight-only error.

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

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls(*quantize_int8(weight), bias)

    @staticmethod
    def stored(N: int, K: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{name: (shape, dtype)} of the tensors an [N, K] weight is stored as."""
        return {"qweight": ((N, K), torch.int8), "scale": ((N,), torch.float32)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.kernel is not None and x2.device.type == "cpu":
            y = self.kernel.half_linear(x2.float().contiguous(), self.qweight).mul_(self.scale)
            if self.bias is not None:
                y.add_(self.bias)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
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
    """Int4 weights in groups of `group_size` along the input dimension, each group with its own
    scale and offset (asymmetric: w ~ (q - 8) * scale + zero, q in 0..15, scale and zero in bf16),
    run by torch's int4 kernel (`_weight_int4pack_mm_for_cpu`), which unpacks on the fly and
    computes in fp32: a quarter of bf16's bytes per weight, plus 4 bytes per group.

    Built from the stored form, the kernel's own operands: `qweight` uint8 [N, K/2] from
    `_convert_weight_to_int4pack_for_cpu` (its layout depends on the CPU capability torch runs
    at: see `int4_packing`) and `scales_and_zeros` bf16 [K/G, N, 2]; `from_weight` quantises.
    """

    GROUP_SIZES = (64, 32, 128)  # the first that divides the input width (64: 0.5 + 0.0625 B/weight)
    STORED = ("qweight", "scales_and_zeros")  # the constructor's tensors, as a checkpoint names them

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], 2 * qweight.shape[1]
        self.group_size = self.in_features // scales_and_zeros.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        return cls(*quantize_int4(weight), bias)

    @staticmethod
    def stored(N: int, K: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{name: (shape, dtype)} of the tensors an [N, K] weight is stored as."""
        G = int4_group_size(K)
        return {"qweight": ((N, K // 2), torch.uint8), "scales_and_zeros": ((K // G, N, 2), torch.bfloat16)}

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


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales_and_zeros) for `_weight_int4pack_mm_for_cpu`, in groups of `int4_group_size`."""
    N, K = weight.shape
    G = int4_group_size(K)
    w = weight.detach().float().view(N, K // G, G)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-10).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()  # the value q = 8 stands for
    q = ((w - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.int32).view(N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [N, K/2] uint8
    # [K/G, N, 2]: the kernel's layout of per-group (scale, zero)
    return packed, torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def int4_group_size(in_features: int) -> int:
    for G in Int4Linear.GROUP_SIZES:
        if in_features % G == 0:
            return G
    raise ValueError(f"int4 needs an input width divisible by 32, got {in_features}")


def int4_packing() -> dict[str, str]:
    """What `_convert_weight_to_int4pack_for_cpu` produces here: torch packs int4 weights in a
    layout of its CPU capability (blocks of 64 rows with AVX-512, 32 with AVX2, another without
    vector code), and the kernel reads only its own. `probe` fingerprints the layout by packing a
    fixed matrix; a stored checkpoint is usable where the fingerprints agree."""
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    digest = hashlib.sha256(packed.contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "probe": digest}


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
    native bf16, where it is built): weight-only int8, fp32 activations, nothing packed at load.
    Elsewhere fbgemm's dynamic kernel (activations quantised too; VNNI where the CPU has it)."""
    return not native_bf16() and in_features % 8 == 0 and kernels.load() is not None


def quantized_kernel(scheme: str) -> str:
    """The name `lm.kernel` records for a decoder quantised to `scheme`."""
    if scheme == "int8" and int8_in_place(8):
        return "int8-avx2"
    return {"int8": "int8-fbgemm" if has_fbgemm() else "int8", "int4": "int4"}[scheme]


QUANTIZERS: dict[str, type[Int8Linear] | type[Int4Linear]] = {"int8": Int8Linear, "int4": Int4Linear}
