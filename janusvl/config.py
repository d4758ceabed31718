"""Typed, frozen views of a DeepSeek Janus `config.json`.

Field names are the checkpoint's own keys. `JanusConfig.from_dict` applies the documented LLaMA
defaults (Janus-Pro-7B omits most of its language fields) and rejects what cannot be honoured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class VisionSpec:
    width: int
    layers: int
    heads: int
    patch_size: int
    mlp_hidden: int


# The SigLIP towers DeepSeek's code knows by name (timm layout, no class token, MAP pooling head).
VISION_MODELS: dict[str, VisionSpec] = {
    "siglip_large_patch16_384": VisionSpec(1024, 24, 16, 16, 4096),
    "siglip_so400m_patch14_384": VisionSpec(1152, 27, 16, 14, int(1152 * 3.7362)),
}


# transformers' names for how attention is computed. janusvl computes all three with torch's
# scaled_dot_product_attention: the same softmax(q k^T / sqrt(d)) v, differing only in rounding order.
ATTN_IMPLEMENTATIONS = {"eager", "sdpa", "flash_attention_2"}


def _expect(section: str, key: str, value: Any, allowed: set[str]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"config.json: unsupported {section}.{key} {value!r}; janusvl supports {sorted(allowed)}"
        )


def _params(section: str, raw: dict[str, Any], cls_allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json: {section} must be an object, got {type(raw).__name__}")
    _expect(section, "cls", raw.get("cls"), cls_allowed)
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: {section}.params must be an object")
    return params


def _take(cls: type, section: str, values: dict[str, Any]) -> Any:
    """Build dataclass `cls` from the known keys of `values`, converting numbers to the field type."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in values or not f.init:
            continue
        value = values[f.name]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        try:
            if kind == "int" and not isinstance(value, bool):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif kind == "float":
                value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config.json: {section}.{f.name} must be a {kind}, got {value!r}") from None
        kwargs[f.name] = value
    return cls(**kwargs)


# (smallest, largest) value per key. Zero or a negative size cannot build a model, and values far
# beyond any Janus release are refused before memory is allocated for them.
_DIM = (1, 2**17)
_LIMITS: dict[str, dict[str, tuple[int, int]]] = {
    "vision_config.params": {"image_size": (1, 4096)},
    "aligner_config.params": {"depth": (1, 64), "input_dim": _DIM, "n_embed": _DIM},
    "gen_aligner_config.params": {"depth": (1, 64), "input_dim": _DIM, "n_embed": _DIM},
    "gen_vision_config.params": {"image_token_size": (1, 2**22), "n_embed": (1, 4096),
                                 "base_channels": (1, 4096), "z_channels": (1, 4096), "num_res_blocks": (1, 64)},
    "gen_head_config.params": {"n_embed": _DIM, "image_token_embed": _DIM, "image_token_size": (1, 2**22)},
    "language_config": {"vocab_size": (1, 2**22), "hidden_size": _DIM, "intermediate_size": (1, 2**19),
                        "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024),
                        "num_key_value_heads": (1, 1024), "max_position_embeddings": (1, 2**21)},
}


def _check_limits(section: str, cfg: Any) -> None:
    for key, (low, high) in _LIMITS[section].items():
        value = getattr(cfg, key)
        if not low <= value <= high:
            raise ConfigError(f"config.json: {section}.{key} must be in [{low}, {high}], got {value}")


@dataclass(frozen=True)
class VisionConfig:
    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    select_feature: str = "same"
    select_layer: int = -1

    @property
    def spec(self) -> VisionSpec:
        return VISION_MODELS[self.model_name]

    @property
    def num_blocks(self) -> int:
        """Blocks DeepSeek's tower builds: select_layer <= 0 counts from the end, > 0 from the start."""
        total = self.spec.layers
        if self.select_layer <= 0:
            return min(total, total + self.select_layer + 1)
        return min(total, self.select_layer)

    @property
    def grid(self) -> int:
        return self.image_size // self.spec.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class AlignerConfig:
    projector_type: str = "mlp_gelu"
    depth: int = 2
    input_dim: int = 1024
    n_embed: int = 2048


@dataclass(frozen=True)
class GenVisionConfig:
    """VQ-16 (LlamaGen). DeepSeek's code builds it with fixed sizes; the four size keys below are a
    janusvl extension that lets test checkpoints carry a smaller decoder. Real checkpoints omit them."""

    image_token_size: int = 16384
    n_embed: int = 8
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)


@dataclass(frozen=True)
class GenHeadConfig:
    n_embed: int = 2048
    image_token_embed: int = 2048
    image_token_size: int = 16384


@dataclass(frozen=True)
class LanguageConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0  # 0 until from_dict fills in num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class QuantizationConfig:
    """`quantization_config` of a checkpoint written by `janusvl convert --quantize`: the decoder's
    projections are stored as the int8 or int4 kernels' operands (janusvl.loading.quantized).
    `modules` maps each stored layer (a pattern, `*` for the layer index) to the layers of
    DeepSeek's layout it replaces, fused in that order; `group_size` gives int4's group size per
    stored layer (int8 has one scale per row: null)."""

    quant_method: str = "janusvl"
    scheme: str = "int8"
    modules: dict[str, list[str]] = field(default_factory=dict)
    group_size: dict[str, int] | None = None


QUANT_SCHEMES = ("int8", "int4")


def _quantization(raw: Any) -> QuantizationConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("config.json: quantization_config must be an object")
    method = raw.get("quant_method")
    if method != "janusvl":
        raise ConfigError(f"config.json: quantization_config.quant_method {method!r} is not supported; janusvl "
                          "loads the int8 and int4 checkpoints `janusvl convert --quantize` writes")
    _expect("quantization_config", "scheme", raw.get("scheme"), set(QUANT_SCHEMES))
    modules, groups = raw.get("modules"), raw.get("group_size")
    if raw.get("int4_packing") is not None:
        raise ConfigError("config.json: this int4 checkpoint holds torch's CPU-specific int4 packing, written by "
                          "an earlier janusvl; convert its unquantised source again (janusvl convert SRC DST "
                          "--quantize int4), or quantise at load (quantize='int4')")
    if not (isinstance(modules, dict) and modules and all(
            isinstance(k, str) and isinstance(v, list) and v and all(isinstance(n, str) for n in v)
            for k, v in modules.items())):
        raise ConfigError("config.json: quantization_config.modules must map layer names to lists of the layers "
                          f"they replace, got {modules!r:.80}")
    if raw["scheme"] == "int4":
        if not (isinstance(groups, dict) and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in groups.values())):
            raise ConfigError(f"config.json: quantization_config.group_size must map layers to group sizes, "
                              f"got {groups!r:.80}")
    elif groups is not None:
        raise ConfigError("config.json: int8 quantization_config has one scale per row: group_size must be "
                          "absent or null")
    return QuantizationConfig(method, raw["scheme"], {k: list(v) for k, v in modules.items()},
                              None if groups is None else dict(groups))


@dataclass(frozen=True)
class JanusConfig:
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    aligner_config: AlignerConfig = field(default_factory=AlignerConfig)
    gen_vision_config: GenVisionConfig = field(default_factory=GenVisionConfig)
    gen_aligner_config: AlignerConfig = field(default_factory=lambda: AlignerConfig(input_dim=8))
    gen_head_config: GenHeadConfig = field(default_factory=GenHeadConfig)
    language_config: LanguageConfig = field(default_factory=LanguageConfig)
    torch_dtype: str | None = None
    quantization_config: QuantizationConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JanusConfig:
        if not isinstance(data, dict):
            raise ConfigError("config.json must hold a JSON object")
        _expect("config", "model_type", data.get("model_type"), {"multi_modality"})
        for key in ("vision_config", "aligner_config", "gen_vision_config", "gen_aligner_config",
                    "gen_head_config", "language_config"):
            if key not in data:
                raise ConfigError(f"config.json: missing section {key!r}")
        head = _take(GenHeadConfig, "gen_head_config.params",
                     _params("gen_head_config", data["gen_head_config"], {"vision_head"}))
        _check_limits("gen_head_config.params", head)
        config = cls(
            vision_config=_vision(data["vision_config"]),
            aligner_config=_aligner("aligner_config", data["aligner_config"]),
            gen_vision_config=_gen_vision(data["gen_vision_config"]),
            gen_aligner_config=_aligner("gen_aligner_config", data["gen_aligner_config"]),
            gen_head_config=head,
            language_config=_language(data["language_config"]),
            torch_dtype=data.get("torch_dtype"),
            quantization_config=_quantization(data.get("quantization_config")),
            raw=data,
        )
        _check_together(config)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> JanusConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json; is this a Janus checkpoint directory?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config.json: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _vision(raw: dict[str, Any]) -> VisionConfig:
    params = _params("vision_config", raw, {"CLIPVisionTower"})
    cfg = _take(VisionConfig, "vision_config.params", params)
    _expect("vision_config.params", "model_name", cfg.model_name, set(VISION_MODELS))
    _check_limits("vision_config.params", cfg)
    if cfg.image_size % cfg.spec.patch_size:
        raise ConfigError(
            f"config.json: vision_config.params.image_size {cfg.image_size} is not a multiple of "
            f"the patch size {cfg.spec.patch_size}"
        )
    if cfg.num_blocks < 0:
        raise ConfigError(
            f"config.json: vision_config.params.select_layer {cfg.select_layer} selects no layer of "
            f"{cfg.model_name}'s {cfg.spec.layers}; it must be >= {-cfg.spec.layers - 1}"
        )
    return cfg


def _aligner(section: str, raw: dict[str, Any]) -> AlignerConfig:
    cfg = _take(AlignerConfig, f"{section}.params", _params(section, raw, {"MlpProjector"}))
    _expect(f"{section}.params", "projector_type", cfg.projector_type, {"identity", "linear", "mlp_gelu"})
    _check_limits(f"{section}.params", cfg)
    return cfg


def _gen_vision(raw: dict[str, Any]) -> GenVisionConfig:
    params = dict(_params("gen_vision_config", raw, {"VQ-16"}))
    if "channel_multiplier" in params:
        mult = params["channel_multiplier"]
        if not (isinstance(mult, list) and 1 <= len(mult) <= 8
                and all(isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= 64 for m in mult)):
            raise ConfigError("config.json: gen_vision_config.params.channel_multiplier must be a list of 1 to 8 "
                              f"integers in [1, 64], got {mult!r:.60}")
        params["channel_multiplier"] = tuple(mult)
    cfg = _take(GenVisionConfig, "gen_vision_config.params", params)
    _check_limits("gen_vision_config.params", cfg)
    # Every VQ block normalises with GroupNorm(32 groups).
    odd = [m for m in cfg.channel_multiplier if cfg.base_channels * m % 32]
    if odd:
        raise ConfigError(f"config.json: gen_vision_config.params.base_channels {cfg.base_channels} x "
                          f"channel_multiplier {odd[0]} is not a multiple of 32 (GroupNorm's groups)")
    return cfg


def _language(raw: dict[str, Any]) -> LanguageConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config.json: language_config must be an object")
    cfg = _take(LanguageConfig, "language_config", raw)
    if not raw.get("num_key_value_heads"):
        cfg = LanguageConfig(**{**cfg.__dict__, "num_key_value_heads": cfg.num_attention_heads})
    _expect("language_config", "hidden_act", cfg.hidden_act, {"silu"})
    if raw.get("_attn_implementation") is not None:
        _expect("language_config", "_attn_implementation", raw["_attn_implementation"], ATTN_IMPLEMENTATIONS)
    scaling = raw.get("rope_scaling")
    if scaling not in (None, {}) and (scaling or {}).get("rope_type", scaling.get("type")) != "default":
        raise ConfigError(f"config.json: language_config.rope_scaling {scaling!r} is not supported")
    if raw.get("mlp_bias"):
        raise ConfigError("config.json: language_config.mlp_bias true is not supported")
    _check_limits("language_config", cfg)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"config.json: language_config.hidden_size {cfg.hidden_size} is not a multiple of "
                          f"num_attention_heads {cfg.num_attention_heads} (head_dim must be whole)")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"config.json: language_config.num_attention_heads {cfg.num_attention_heads} is not a "
                          f"multiple of num_key_value_heads {cfg.num_key_value_heads}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = getattr(cfg, key)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"config.json: language_config.{key} must be a positive number, got {value}")
    return cfg


def _check_together(cfg: JanusConfig) -> None:
    """The sections must fit each other: each projector maps what feeds it to the decoder's width,
    and the generation head draws from the VQ codebook."""
    D = cfg.language_config.hidden_size

    def out_dim(a: AlignerConfig) -> int:
        return a.input_dim if a.projector_type == "identity" else a.n_embed

    pairs = [
        ("aligner_config.params.input_dim", cfg.aligner_config.input_dim,
         "the vision tower's width", cfg.vision_config.spec.width),
        ("aligner_config.params.n_embed", out_dim(cfg.aligner_config), "language_config.hidden_size", D),
        ("gen_aligner_config.params.input_dim", cfg.gen_aligner_config.input_dim,
         "gen_vision_config.params.n_embed", cfg.gen_vision_config.n_embed),
        ("gen_aligner_config.params.n_embed", out_dim(cfg.gen_aligner_config), "language_config.hidden_size", D),
        ("gen_head_config.params.n_embed", cfg.gen_head_config.n_embed, "language_config.hidden_size", D),
        ("gen_head_config.params.image_token_size", cfg.gen_head_config.image_token_size,
         "gen_vision_config.params.image_token_size", cfg.gen_vision_config.image_token_size),
    ]
    for key, value, other, want in pairs:
        if value != want:
            raise ConfigError(f"config.json: {key} {value} disagrees with {other} {want}")
