"""Pre-quantised checkpoints: the decoder's projections stored as the int8 / int4 kernels' operands.

`janusvl convert SRC DST --quantize int8|int4` writes them. Everything but the decoder's linear
layers keeps DeepSeek's keys and dtypes. Each layer's projections are stored fused the way
`janusvl.models.fast.optimize` runs them (`self_attn.qkv_proj` for q/k/v, `mlp.gate_up_proj` for
gate/up, then `self_attn.o_proj`, `mlp.down_proj` and `lm_head`), each as the tensors its layer
is built from (janusvl.models.quant):

    int8: `<layer>.qweight` int8 [N, K], `<layer>.scale` float32 [N]
    int4: `<layer>.qweight` uint8 [N, K/2] (two values a byte), `<layer>.scales` and
          `<layer>.lows` bfloat16 [N, K/G] (janusvl.models.quant.Int4Linear)
    both: `<layer>.bias` when the projections have biases

config.json's `quantization_config` says which scheme, which layers and int4's group sizes; the
stored layout is the same on every CPU. Loading reads these tensors memory-mapped and builds the
layers on them: nothing is quantised at load, and the results are those of quantising at load.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..config import JanusConfig, QuantizationConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..models.fast import LAYER_PROJECTIONS, projections, release_pages
from ..models.quant import QUANTIZERS, SCHEMES, int4_group_size, quantize_int4, quantize_int8, quantized_kernel

LM = "language_model."
_EMBED = "model.embed_tokens"


def stored_layers(config: JanusConfig) -> dict[str, tuple[str, ...]]:
    """{stored layer: the layers of DeepSeek's layout it replaces}, keys relative to the decoder
    (`model.layers.0.self_attn.qkv_proj`); a tied head is quantised from the embedding."""
    lc = config.language_config
    layers = projections(lc.num_hidden_layers)
    if lc.tie_word_embeddings:
        layers["lm_head"] = (_EMBED,)
    return layers


def modules_entry() -> dict[str, list[str]]:
    """`quantization_config.modules` as this version writes and reads it."""
    out = {f"{LM}model.layers.*.{new}": [old.rpartition(".")[2] for old in olds]
           for new, olds in LAYER_PROJECTIONS.items()}
    return {**out, f"{LM}lm_head": ["lm_head"]}


def _kind(layer: str) -> str:
    """"self_attn.qkv_proj" for "model.layers.3.self_attn.qkv_proj"; "lm_head" for the head."""
    return layer if layer == "lm_head" else layer.split(".", 3)[3]


def _shape(config: JanusConfig, layer: str) -> tuple[int, int]:
    """[N, K] of a stored layer's (fused) weight."""
    lc = config.language_config
    D, F, hd = lc.hidden_size, lc.intermediate_size, lc.head_dim
    return {"self_attn.qkv_proj": ((lc.num_attention_heads + 2 * lc.num_key_value_heads) * hd, D),
            "self_attn.o_proj": (D, lc.num_attention_heads * hd),
            "mlp.gate_up_proj": (2 * F, D), "mlp.down_proj": (D, F), "lm_head": (lc.vocab_size, D)}[_kind(layer)]


def check_quantizable(config: JanusConfig, scheme: str) -> None:
    """Refuse, naming the width, a decoder `scheme` cannot hold."""
    if scheme not in SCHEMES:
        raise InputError(f"quantize must be none, int8 or int4, got {scheme!r}")
    if scheme == "int4":
        lc = config.language_config
        for key in ("hidden_size", "intermediate_size"):
            if getattr(lc, key) % 32:
                raise InputError(f"int4 quantises in groups of 32 to 128 along the input width, and "
                                 f"language_config.{key} {getattr(lc, key)} is not a multiple of 32")


def quantization_config_dict(config: JanusConfig, scheme: str) -> dict[str, Any]:
    """The `quantization_config` a checkpoint of `config` quantised to `scheme` carries."""
    out: dict[str, Any] = {"quant_method": "janusvl", "scheme": scheme, "modules": modules_entry()}
    if scheme == "int4":
        out["group_size"] = {_kind(layer): int4_group_size(_shape(config, layer)[1])
                             for layer in ("model.layers.0." + k for k in LAYER_PROJECTIONS)}
        out["group_size"]["lm_head"] = int4_group_size(config.language_config.hidden_size)
    return out


# --- reading -------------------------------------------------------------------------------------

def check_loadable(config: JanusConfig, device: torch.device) -> QuantizationConfig | None:
    """The checkpoint's quantisation, refused with the reason when this version, this machine or
    `device` cannot run it as stored."""
    q = config.quantization_config
    if q is None:
        return None
    if q.modules != modules_entry():
        raise ConfigError(f"config.json: quantization_config.modules {q.modules!r:.120} are not the layers "
                          "this janusvl version stores quantised; convert the checkpoint again")
    if q.scheme == "int4":
        want = quantization_config_dict(config, "int4")["group_size"]
        if q.group_size != want:
            raise ConfigError(f"config.json: quantization_config.group_size {q.group_size} differs from the "
                              f"groups janusvl's int4 layers use for these widths, {want}")
        if device.type != "cpu":
            raise CheckpointError(f"int4 checkpoints run on the CPU only; load it on device='cpu', not {device}")
    return q


def expected_tensors(config: JanusConfig, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`expected` (the unquantised model's keys) with the quantised layers' sources replaced by
    their stored tensors (meta, in their exact shapes and dtypes)."""
    q = config.quantization_config
    kind = QUANTIZERS[q.scheme]
    out = dict(expected)
    for layer, sources in stored_layers(config).items():
        biases = [expected.get(f"{LM}{s}.bias") for s in sources if s != _EMBED]
        for s in sources:
            if s != _EMBED:
                out.pop(f"{LM}{s}.weight", None)
                out.pop(f"{LM}{s}.bias", None)
        N, K = _shape(config, layer)
        for name, (shape, dtype) in kind.stored(N, K).items():
            out[f"{LM}{layer}.{name}"] = torch.empty(shape, dtype=dtype, device="meta")
        if biases and biases[0] is not None:
            out[f"{LM}{layer}.bias"] = torch.empty(N, device="meta")
    out.pop(f"{LM}lm_head.weight", None)
    return out


def exact_dtype_keys(config: JanusConfig) -> frozenset[str]:
    """The stored kernel operands: they must have their exact dtype, and keep it whatever dtype
    the model loads in (only biases follow the model's)."""
    q = config.quantization_config
    if q is None:
        return frozenset()
    names = QUANTIZERS[q.scheme].STORED
    return frozenset(f"{LM}{layer}.{name}" for layer in stored_layers(config) for name in names)


def install(lm: torch.nn.Module, state: dict[str, torch.Tensor], config: JanusConfig) -> None:
    """Put the quantised layers, built on their loaded tensors in `state`, in place of the
    decoder's projections (still on the meta device). int8 layers pack fbgemm's copy from
    `qweight` (single-threaded inside fbgemm, so layers in parallel), then hand back the pages
    packing read: prompts read them again from the file, decode steps only the packed copy."""
    q = config.quantization_config
    kind = QUANTIZERS[q.scheme]
    layers = stored_layers(config)

    def build(layer: str) -> None:
        built = kind(*(state[f"{LM}{layer}.{name}"] for name in kind.STORED), state.get(f"{LM}{layer}.bias"))
        parent, _, name = layer.rpartition(".")
        owner = lm.get_submodule(parent)
        for source in layers[layer]:
            if source != _EMBED:
                delattr(owner, source.rpartition(".")[2])
        setattr(owner, name, built)
        if getattr(built, "packed", None) is not None:
            release_pages(built.qweight)

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for done in [pool.submit(build, layer) for layer in layers]:
            done.result()
    lm.kernel, lm.quantization = quantized_kernel(q.scheme), q.scheme


def resolve_quantize(root: Path | str, stored: str | None, requested: str | None) -> str | None:
    """The quantisation to load with: the checkpoint's own unless `requested` says otherwise,
    which is an error when the checkpoint is already quantised to something else."""
    if requested is None:
        return stored
    if requested not in ("none", *SCHEMES):
        raise InputError(f"quantize must be None, 'int8' or 'int4', got {requested!r}")
    wanted = None if requested == "none" else requested
    if stored is not None and wanted != stored:
        raise InputError(f"quantize={requested!r} conflicts with {root}, whose decoder is stored quantised to "
                         f"{stored} (config.json quantization_config); leave quantize unset to load it as "
                         "stored, or quantise its unquantised source instead")
    return wanted


# --- writing -------------------------------------------------------------------------------------

def quantize_stream(tensors: Iterator[tuple[str, torch.Tensor]], config: JanusConfig, scheme: str,
                    expected: dict[str, torch.Tensor], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` (a checkpoint's, in stored order) with the decoder's projections replaced by
    their quantised form, each emitted once all its sources have passed (a layer or so is held).
    Weights are quantised in `dtype`, the dtype the model loads in, as quantising at load does."""
    layers = stored_layers(config)
    owner = {f"{LM}{s}": layer for layer, sources in layers.items() for s in sources}
    pending: dict[str, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    needed = {layer: {k for s in sources for k in (f"{LM}{s}.weight", f"{LM}{s}.bias") if k in expected}
              for layer, sources in layers.items()}
    needed["lm_head"] = {f"{LM}{layers['lm_head'][0]}.weight"}
    for key, tensor in tensors:
        module = key.rpartition(".")[0]
        layer = owner.get(module)
        if layer is None or key not in needed[layer]:
            yield key, tensor
            continue
        if module == f"{LM}{_EMBED}":
            yield key, tensor  # a tied head's source: the embedding stays as it is
        pending[layer][key] = tensor
        if set(pending[layer]) == needed[layer]:
            yield from _quantized(layer, layers[layer], pending.pop(layer), scheme, dtype)


def _quantized(layer: str, sources: tuple[str, ...], parts: dict[str, torch.Tensor], scheme: str,
               dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    weight = torch.cat([parts[f"{LM}{s}.weight"].to(dtype) for s in sources])
    biases = [parts.get(f"{LM}{s}.bias") for s in sources]
    stored = (quantize_int8 if scheme == "int8" else quantize_int4)(weight)
    for name, tensor in zip(QUANTIZERS[scheme].STORED, stored, strict=True):
        yield f"{LM}{layer}.{name}", tensor
    if biases[0] is not None:
        yield f"{LM}{layer}.bias", torch.cat([b.to(dtype) for b in biases])


def check_convertible(root: Path, config: JanusConfig, scheme: str | None, to: str,
                      cast: torch.dtype | None) -> None:
    """Refuse, with the reason, a conversion that cannot keep a quantised checkpoint's meaning."""
    stored = config.quantization_config.scheme if config.quantization_config else None
    if scheme is not None and stored is not None:
        raise InputError(f"{root} is already quantised ({stored}); --quantize needs an unquantised checkpoint "
                         "(convert the one it was made from)")
    if scheme is not None and to != "deepseek":
        raise InputError(f"--quantize writes janusvl's own quantised layers, which the {to} layout has no place "
                         "for; use --to deepseek")
    if stored is not None and (to != "deepseek" or cast is not None):
        raise InputError(f"{root} is quantised ({stored}): it can only be copied as it is (--to deepseek, "
                         "--dtype keep); convert its unquantised source instead")
    if scheme is not None:
        check_quantizable(config, scheme)
