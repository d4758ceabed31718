"""janusvl's own CPU kernels, compiled from source on first use with the machine's C++ compiler.

`half_linear(x, W)`: x float32 [M, K] times weights W [N, K] (bf16, fp16, or int8 whose row
scales the caller applies; read in place, no repacking), in fp32 arithmetic, on AVX2 + FMA +
F16C; `decode_attention(q, k, v, valid, scale)`: one query per row over a bf16/fp16 KV cache;
`rms_norm` and `rope`: the decoder's small ops in one call each. They exist for CPUs without
native bf16, where torch multiplies two or more rows by bf16 weights in a scalar loop and
fbgemm's kernels need a repacked copy of every weight. Up to 128 rows each output is a dot
product summed in a fixed order whatever the number of rows (see half_linear.cpp), so a batch's
rows equal the same rows computed alone; more rows (prompts) go through MKL's fp32 product on
weight panels widened in cache.

`int8_linear` and `int4_linear` (int_linear.cpp): int8 and int4 weights by integer dot products
with activations quantised per block (decode-sized calls), or widened weight panels (prompts);
`int4_dequantize` gives the fp32 weights of int4 operands.

`decode_layers` (decoder_step.cpp): a whole decode step through every decoder layer in one call,
the same kernels in the same order as the layers' Python forward (bit-identical), without the
Python dispatch of ~30 small ops a layer. ops.h declares what bindings.cpp exposes.

The extension is built once per source, torch version and torch installation (virtualenv) into
~/.cache/janusvl/kernels (or $JANUSVL_KERNEL_CACHE) by torch.utils.cpp_extension, which needs
ninja and a C++ compiler.
Where it cannot be built, or the CPU lacks the instructions, `load()` returns None and the
callers keep the kernels torch has. JANUSVL_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).with_name(name) for name in (
    "half_linear.cpp", "int_linear.cpp", "decoder_step.cpp", "bindings.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("simd.h", "ops.h")]  # part of the build hash
NEEDED_FLAGS = ("avx2", "fma", "f16c")

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None when they can (they may still fail to build)."""
    if os.environ.get("JANUSVL_KERNELS", "1") == "0":
        return "JANUSVL_KERNELS=0"
    missing = [flag for flag in NEEDED_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return None


def build_directory() -> Path:
    """One directory per source, torch version and torch installation: torch's builder rebuilds
    whenever the include paths written in a directory's build.ninja change, so two virtualenvs
    sharing one directory would rebuild each other's copy (a minute each time)."""
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    install = str(Path(torch.__file__).resolve().parent).encode()
    tag = hashlib.sha256(source + torch.__version__.encode() + install).hexdigest()[:12]
    root = Path(os.environ.get("JANUSVL_KERNEL_CACHE", Path.home() / ".cache" / "janusvl" / "kernels"))
    return root / tag


def load() -> ModuleType | None:
    """The compiled kernels (built on the first call of a version), or None where they cannot run."""
    with _lock:
        if "module" not in _loaded:
            _loaded["module"] = _build()
        return _loaded["module"]


def _build() -> ModuleType | None:
    if unavailable_reason() is not None:
        return None
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        print("janusvl: compiling its CPU kernel (once per version, about half a minute)...", file=sys.stderr)
    try:
        return cpp_extension.load(
            name=f"janusvl_half_linear_{directory.name}", sources=[str(path) for path in SOURCES], build_directory=str(directory),
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: keep torch's kernels
        warnings.warn(f"janusvl could not build its CPU kernel ({type(exc).__name__}: {str(exc)[:300]}); "
                      "half-precision decoding falls back to torch's kernels", RuntimeWarning, stacklevel=3)
        return None
