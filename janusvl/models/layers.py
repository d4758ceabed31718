"""Drop-in layers that keep bf16 and fp16 models usable on CPUs without native arithmetic for them.

On x86 CPUs without AVX-512 BF16 (AVX2-only machines, older Xeons), PyTorch has no fast bf16
matrix kernel: a bf16 GEMM or convolution falls back to scalar loops that run hundreds of times
slower than fp32 (measured on an AVX2 Zen 3: a 2048x4096x2048 bf16 GEMM 122 s, fp32 0.21 s; a
128-channel 384x384 bf16 convolution 152 s, fp32 0.36 s). fp16 is the same without AVX-512 FP16
or AMX-FP16 (a 128-channel 96x96 fp16 convolution 10 s, fp32 0.14 s). There, the compute-bound
calls (many rows, convolutions, attention over many queries) convert their operands to fp32,
compute, and round the result back to the half type, one layer at a time: the weights stay half
precision in memory and the result is the rounding of what a native kernel accumulates in fp32.
Decode-sized products (a few rows) keep the half-precision path, which is memory bound and reads
half the bytes. On every other CPU and device these layers are exactly torch's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Products with at most this many rows are memory bound: bf16 and fp16 are fine there without native support.
SMALL_ROWS = 16


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (oneDNN's check: AVX-512 BF16, AMX, ...)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def native_fp16() -> bool:
    """Whether this CPU runs fp16 matrix products natively (oneDNN's check: AVX-512 FP16, AMX-FP16)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def emulated(x: torch.Tensor) -> bool:
    """True where bf16 or fp16 compute on `x` would take torch's slow scalar fallback."""
    if x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16:
        return not native_bf16()
    return x.dtype == torch.float16 and not native_fp16()


def _up(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if emulated(x) and x.numel() > SMALL_ROWS * x.shape[-1]:
        return F.linear(x.float(), weight.float(), _up(bias)).to(x.dtype)
    return F.linear(x, weight, bias)


def fp32_product(x: torch.Tensor, out_features: int, product: Callable[[torch.Tensor], torch.Tensor],
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """product(x's rows as contiguous fp32 [M, K]) -> fp32 [M, out_features], plus `bias` in fp32,
    returned in x's dtype and shape: how the CPU kernels that compute in fp32 are called."""
    y = product(x.reshape(-1, x.shape[-1]).float().contiguous())
    if bias is not None:
        y.add_(bias)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              **kwargs: object) -> torch.Tensor:
    """F.scaled_dot_product_attention, in fp32 for half-precision queries where they are emulated
    and there are many of them or the keys are already fp32 (kv_cache.py's caches there)."""
    if emulated(q) and (q.shape[-2] > 1 or k.dtype == torch.float32):
        mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if emulated(a):
        return torch.bmm(a.float(), b.float()).to(a.dtype)
    return torch.bmm(a, b)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if emulated(x):
            return self._conv_forward(x.float(), self.weight.float(), _up(self.bias)).to(x.dtype)
        return super().forward(x)


class Embedding(nn.Embedding):
    """nn.Embedding that leaves its weight uninitialised on the meta device. The checkpoint
    supplies the weight; torch's meta-device normal_ would import its Python reference kernels
    (~1.7 s) just to draw nothing."""

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()
