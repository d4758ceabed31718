"""DeepSeek's Janus layout -> transformers' Janus layout (`JanusForConditionalGeneration`).

transformers serves as our test oracle and as an export target. Every DeepSeek key is either
renamed by one rule in `_RULES`, or explicitly dropped; any other key is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from ..config import JanusConfig
from ..errors import CheckpointError, ConfigError

_VT = r"vision_model\.vision_tower\."
_VQ = r"gen_vision_model\."
_WB = r"(weight|bias)"
_RES_LEAF = rf"(norm1|conv1|norm2|conv2|nin_shortcut)\.{_WB}"
_ATTN_LEAF = rf"(norm|q|k|v|proj_out)\.{_WB}"
_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}

Rule = tuple[str, str | Callable[[re.Match[str]], str] | None]


def _mlp_gelu(dst: str) -> Callable[[re.Match[str]], str]:
    # DeepSeek's Sequential puts Linears at 0, 2, 4, ... (GELUs between); transformers names them
    # fc1, hidden_layers.0, hidden_layers.1, ...
    def rename(m: re.Match[str]) -> str:
        i = int(m[1]) // 2
        return f"{dst}.fc1.{m[2]}" if i == 0 else f"{dst}.hidden_layers.{i - 1}.{m[2]}"
    return rename


# (full-match pattern, target) in DeepSeek key order. Target None = dropped on purpose. The two keys
# whose tensors change (fused qkv, pos_embed) are reshaped in `to_transformers_state_dict`.
_RULES: list[Rule] = [
    (_VT + rf"patch_embed\.proj\.{_WB}", r"model.vision_model.embeddings.patch_embedding.\1"),
    (_VT + r"pos_embed", "model.vision_model.embeddings.position_embedding.weight"),
    (_VT + rf"blocks\.(\d+)\.attn\.qkv\.{_WB}", r"model.vision_model.encoder.layers.\1.self_attn.{}_proj.\2"),
    (_VT + rf"blocks\.(\d+)\.attn\.proj\.{_WB}", r"model.vision_model.encoder.layers.\1.self_attn.projection_layer.\2"),
    (_VT + rf"blocks\.(\d+)\.norm([12])\.{_WB}", r"model.vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (_VT + rf"blocks\.(\d+)\.mlp\.(fc[12])\.{_WB}", r"model.vision_model.encoder.layers.\1.mlp.\2.\3"),
    (_VT + rf"norm\.{_WB}", r"model.vision_model.post_layernorm.\1"),
    (_VT + r"attn_pool\..+", None),  # SigLIP's pooling head; Janus never runs it
    (rf"aligner\.layers\.(\d*[02468])\.{_WB}", _mlp_gelu("model.aligner")),
    (rf"gen_aligner\.layers\.(\d*[02468])\.{_WB}", _mlp_gelu("model.generation_aligner")),
    (rf"gen_head\.output_mlp_projector\.{_WB}", r"model.generation_head.proj_out.\1"),
    (rf"gen_head\.vision_head\.{_WB}", r"model.generation_head.vision_head.\1"),
    (r"gen_embed\.weight", "model.generation_embeddings.weight"),
    (_VQ + rf"encoder\.conv_blocks\.(\d+)\.res\.(\d+)\.{_RES_LEAF}", r"model.vqmodel.encoder.down.\1.block.\2.\3.\4"),
    (_VQ + rf"encoder\.conv_blocks\.(\d+)\.attn\.(\d+)\.{_ATTN_LEAF}", r"model.vqmodel.encoder.down.\1.attn.\2.\3.\4"),
    (_VQ + rf"encoder\.conv_blocks\.(\d+)\.downsample\.conv\.{_WB}", r"model.vqmodel.encoder.down.\1.downsample.conv.\2"),
    (_VQ + rf"decoder\.conv_blocks\.(\d+)\.res\.(\d+)\.{_RES_LEAF}", r"model.vqmodel.decoder.up.\1.block.\2.\3.\4"),
    (_VQ + rf"decoder\.conv_blocks\.(\d+)\.attn\.(\d+)\.{_ATTN_LEAF}", r"model.vqmodel.decoder.up.\1.attn.\2.\3.\4"),
    (_VQ + rf"decoder\.conv_blocks\.(\d+)\.upsample\.conv\.{_WB}", r"model.vqmodel.decoder.up.\1.upsample.conv.\2"),
    (_VQ + rf"(encoder|decoder)\.mid\.([02])\.{_RES_LEAF}",
     lambda m: f"model.vqmodel.{m[1]}.mid.{_MID[m[2]]}.{m[3]}.{m[4]}"),
    (_VQ + rf"(encoder|decoder)\.mid\.1\.{_ATTN_LEAF}", r"model.vqmodel.\1.mid.attn_1.\2.\3"),
    (_VQ + rf"((?:encoder|decoder)\.(?:conv_in|norm_out|conv_out)|quant_conv|post_quant_conv)\.{_WB}",
     r"model.vqmodel.\1.\2"),
    (_VQ + r"quantize\.embedding\.weight", "model.vqmodel.quantize.embedding.weight"),
    (_VQ + r"quantize\.codebook_used", None),  # LlamaGen's training-time usage counter
    (r"language_model\.model\.embed_tokens\.weight", "model.language_model.embed_tokens.weight"),
    (rf"language_model\.model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.{_WB}",
     r"model.language_model.layers.\1.self_attn.\2_proj.\3"),
    (r"language_model\.model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight",
     r"model.language_model.layers.\1.mlp.\2_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
     r"model.language_model.layers.\1.\2.weight"),
    (r"language_model\.model\.norm\.weight", "model.language_model.norm.weight"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
]
_COMPILED = [(re.compile(p), t) for p, t in _RULES]


def _rename(key: str) -> str | None:
    """The transformers name of DeepSeek key `key`, None when it is dropped on purpose. The fused
    vision qkv key maps to a template with `{}` for q/k/v. Raises CheckpointError on unknown keys."""
    for pattern, target in _COMPILED:
        m = pattern.fullmatch(key)
        if m:
            if target is None:
                return None
            return target(m) if callable(target) else m.expand(target)
    raise CheckpointError(f"no transformers name for checkpoint key {key!r}")


def to_transformers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a full DeepSeek-layout Janus state dict into transformers' layout: fused vision qkv
    split into q/k/v, pos_embed [1, N, W] squeezed to [N, W], attn_pool.* and codebook_used dropped.
    Output tensors may be views sharing storage with the inputs."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        name = _rename(key)
        if name is None:
            continue
        if "{}" in name:  # fused vision qkv
            if t.shape[0] % 3:
                raise CheckpointError(f"{key}: fused qkv has {t.shape[0]} rows, not a multiple of 3")
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):  # rows are [q; k; v]
                out[name.format(part)] = chunk
        elif key.endswith("pos_embed"):
            if t.dim() != 3 or t.shape[0] != 1:
                raise CheckpointError(f"{key}: expected shape [1, N, W], got {list(t.shape)}")
            out[name] = t[0]
        else:
            out[name] = t
    return out


def _vision_mlp_ratio(width: int, hidden: int) -> float:
    # transformers builds the MLP as int(width * mlp_ratio); if hidden / width rounds low, that
    # product truncates to hidden - 1, so nudge the ratio up until it survives.
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def transformers_config_dict(cfg: JanusConfig, image_token_id: int) -> dict[str, Any]:
    """Keyword arguments for `transformers.JanusConfig` describing the same model as `cfg`."""
    v, lm = cfg.vision_config, cfg.language_config
    al, gal, gv, gh = cfg.aligner_config, cfg.gen_aligner_config, cfg.gen_vision_config, cfg.gen_head_config
    for name, a in (("aligner_config", al), ("gen_aligner_config", gal)):
        if a.projector_type != "mlp_gelu":
            raise ConfigError(f"{name}.projector_type {a.projector_type!r} has no transformers equivalent")
    # transformers has one vq projection_dim for both the gen aligner's output and the gen head's
    # hidden width, and sizes the gen aligner's input and the gen head's output from the codebook.
    if gal.n_embed != gh.image_token_embed:
        raise ConfigError(
            f"transformers needs gen_aligner_config.n_embed ({gal.n_embed}) == "
            f"gen_head_config.image_token_embed ({gh.image_token_embed})"
        )
    if gal.input_dim != gv.n_embed or gh.image_token_size != gv.image_token_size:
        raise ConfigError(
            "transformers needs gen_aligner_config.input_dim == gen_vision_config.n_embed and "
            "gen_head_config.image_token_size == gen_vision_config.image_token_size"
        )
    if al.input_dim != v.spec.width:
        raise ConfigError(f"aligner_config.input_dim {al.input_dim} != vision width {v.spec.width}")
    text_config = {
        "model_type": "llama",
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.hidden_size,
        "intermediate_size": lm.intermediate_size,
        "num_hidden_layers": lm.num_hidden_layers,
        "num_attention_heads": lm.num_attention_heads,
        "num_key_value_heads": lm.num_key_value_heads,
        "head_dim": lm.head_dim,
        "hidden_act": lm.hidden_act,
        "max_position_embeddings": lm.max_position_embeddings,
        "rms_norm_eps": lm.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta},
        "attention_bias": lm.attention_bias,
        "tie_word_embeddings": False,
    }
    vision_config = {
        "hidden_size": v.spec.width,
        "num_hidden_layers": v.num_blocks,
        "num_attention_heads": v.spec.heads,
        "patch_size": v.spec.patch_size,
        "image_size": v.image_size,
        "mlp_ratio": _vision_mlp_ratio(v.spec.width, v.spec.mlp_hidden),
        "hidden_act": "gelu",  # exact erf GELU, as timm's SigLIP
        "layer_norm_eps": 1e-6,
        "attention_bias": True,
        "projection_dim": al.n_embed,  # aligner: Linear(width, projection_dim), then depth-1 more
        "depth": al.depth,
        "num_image_tokens": v.num_patches,
    }
    vq_config = {
        "embed_dim": gv.n_embed,
        "num_embeddings": gv.image_token_size,
        "latent_channels": gv.z_channels,
        "base_channels": gv.base_channels,
        "channel_multiplier": list(gv.channel_multiplier),
        "num_res_blocks": gv.num_res_blocks,
        "projection_dim": gal.n_embed,
        "num_hidden_layers": gal.depth,  # gen aligner depth
        "image_token_embed_dim": gh.n_embed,  # gen head input width (the LLM's hidden size)
        "hidden_act": "gelu",
    }
    return {
        "text_config": text_config,
        "vision_config": vision_config,
        "vq_config": vq_config,
        "image_token_id": image_token_id,
        "tie_word_embeddings": False,  # transformers' JanusConfig defaults to True; Janus is untied
    }
