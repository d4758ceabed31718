"""Fast paths for the LLaMA decoder: fused projections and kernels picked per CPU.

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

`optimize` also quantises (int8 rows, int4 groups: `janusvl.models.quant`), which halves or
quarters the bytes read again.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .. import kernels
from .layers import Linear, emulated, fp32_product, linear, native_bf16
from .llama import Attention, LlamaForCausalLM, RMSNorm
from .quant import QUANTIZERS, SCHEMES, has_fbgemm, quantized_kernel


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
        return fp32_product(x, self.out_features, lambda x2: torch.ops.quantized.linear_dynamic_fp16(
            x2, self.packed).mul_(self.unscale), self.bias)  # unscaling is exact: a power of two per output


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
        return fp32_product(x, self.out_features, lambda x2: self.kernel.half_linear(x2, self.weight), self.bias)

    def step_operands(self) -> list[torch.Tensor] | None:
        """What the kernels' one-call decode step multiplies by (janusvl.models.llama)."""
        half = self.weight.dtype in (torch.bfloat16, torch.float16)
        return [self.weight] if half and self.bias is None and self.exact else None


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


# Each decoder layer's projections as `optimize` runs them: {new layer: the loaded layers it
# replaces, fused in this order}. Pre-quantised checkpoints store their tensors under these names.
LAYER_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def projections(num_layers: int) -> dict[str, tuple[str, ...]]:
    """{layer path in the LlamaForCausalLM: paths of the loaded layers it replaces} for every
    projection `optimize` rewrites, the head included."""
    out = {"lm_head": ("lm_head",)}
    for i in range(num_layers):
        out.update({f"model.layers.{i}.{new}": tuple(f"model.layers.{i}.{old}" for old in olds)
                    for new, olds in LAYER_PROJECTIONS.items()})
    return out


def replace_projection(lm: nn.Module, target: str, sources: tuple[str, ...],
                       make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]) -> list[torch.Tensor]:
    """Put make(weight, bias) at `target` in place of `sources` (fused by concatenating their rows;
    a single source is passed as loaded); returns the source weights."""
    olds = [lm.get_submodule(path) for path in sources]
    weights, biases = [m.weight for m in olds], [m.bias for m in olds]
    weight = weights[0] if len(olds) == 1 else torch.cat(weights)
    bias = biases[0] if len(olds) == 1 or biases[0] is None else torch.cat(biases)
    layer = make(weight, bias)
    parent, _, name = target.rpartition(".")
    owner = lm.get_submodule(parent)
    for path in sources:
        delattr(owner, path.rpartition(".")[2])  # the sources are the target's siblings
    setattr(owner, name, layer)
    return weights


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
    """Seconds for one product of 1 row plus one of 8 rows (best of three), each run with the
    weights out of cache as decoding reads them (one layer's weights fit in a large L3, where
    compute would decide alone and a kernel slower from memory could win)."""
    best = float("inf")
    x = torch.randn(8, weight.shape[1]).to(weight.dtype)
    evict = torch.empty(_EVICT_BYTES // 4, dtype=torch.float32)
    with torch.inference_mode():
        for _ in range(3):
            evict.fill_(1.0)  # writing more than the caches hold pushes the weights out
            start = time.perf_counter()
            layer(x[:1])
            layer(x)
            best = min(best, time.perf_counter() - start)
    return best


_EVICT_BYTES = 96 << 20  # more than the last-level cache of the CPUs this runs on (32 MB here)


def _exact_or_plain(kind: type[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """`kind` over the weight, or the plain layer for the rare weight fp16 cannot hold exactly
    (a row spanning more than fp16's range): results never change for speed."""
    layer = kind(weight, bias)
    return layer if getattr(layer, "exact", True) else PlainLinear(weight, bias)


def optimize(lm: LlamaForCausalLM, quantize: str | None = None) -> LlamaForCausalLM:
    """Rewrite the decoder's linear layers in place for inference; returns `lm`.

    quantize=None keeps the weights as loaded: q/k/v and gate/up are fused and every projection
    runs in the kernel `pick_kernel` measured fastest for this CPU (bit-identical to the plain
    path where bf16 is native; fp32 sums of the exact weights where it is emulated);
    quantize="int8" stores every decoder projection and the LM head as int8 rows + scales;
    quantize="int4" as int4 groups + scales and offsets.
    The choice is recorded in `lm.kernel` (and the scheme in `lm.quantization`). A decoder that is
    already quantised (a pre-quantised checkpoint's) is left as it is; another scheme is an error.
    """
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    fuse_small_ops(lm)
    if lm.quantization:  # loaded from a pre-quantised checkpoint, or done before
        if quantize not in (None, lm.quantization):
            raise ValueError(f"the decoder is already quantised to {lm.quantization}; it cannot also be {quantize}")
        return lm
    if quantize is not None:
        lm.kernel, make = quantized_kernel(quantize), QUANTIZERS[quantize].from_weight
    else:
        sample = lm.model.layers[0].mlp.gate_proj.weight if len(lm.model.layers) else lm.lm_head.weight
        picked = pick_kernel(sample)
        if picked is None:
            lm.kernel = "torch"
            return lm  # nothing faster than plain F.linear for this device and dtype
        lm.kernel, kind = picked
        make = functools.partial(_exact_or_plain, kind)
    release = lm.kernel not in ("torch", "avx2-half")  # these read the loaded weights themselves
    tied = lm.lm_head.weight is lm.model.embed_tokens.weight
    targets = projections(len(lm.model.layers))

    def rewrite(i: int) -> None:
        sources = []
        for new in LAYER_PROJECTIONS:
            target = f"model.layers.{i}.{new}"
            weights = replace_projection(lm, target, targets[target], make)
            if len(weights) > 1 or release:  # fused sources are copies: their pages can go whatever the kernel
                sources += weights
        release_pages(*sources)

    def rewrite_head() -> None:
        source = replace_projection(lm, "lm_head", ("lm_head",), make)
        if release and not tied:  # tied: the embedding still reads it
            release_pages(*source)

    # Packing is single-threaded inside fbgemm and oneDNN and releases the GIL: layers in parallel.
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for done in [pool.submit(rewrite_head)] + [pool.submit(rewrite, i) for i in range(len(lm.model.layers))]:
            done.result()
    lm.quantization = quantize
    return lm


def fuse_small_ops(lm: LlamaForCausalLM) -> None:
    """Where bf16/fp16 arithmetic is emulated (AVX2) and janusvl's kernels are built, run the
    decoder's RMSNorms and rotary embeddings in one kernel call each (`rms_norm`, `rope`) instead
    of torch's seven and six small ops: a decode step spends more in dispatching those than in
    computing them. The rotary embedding's values are the plain path's to the bit; the norms'
    sums of squares are added in another order (last-bit differences). Native bf16 keeps torch's
    ops (bit-identical to the plain path there)."""
    if not emulated(lm.model.norm.weight):  # first: fp32 models never build the kernels for this
        return
    kernel = kernels.load()
    if kernel is None:
        return
    for module in lm.modules():
        if isinstance(module, (RMSNorm, Attention)):
            module.kernel = kernel


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
