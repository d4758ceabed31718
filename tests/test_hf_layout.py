"""DeepSeek layout -> transformers layout: every key has a home, tensors land in the right place."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import transformers  # the oracle: a test dependency, so a missing one fails rather than skips

from janusvl.config import VISION_MODELS, AlignerConfig, JanusConfig, VisionConfig
from janusvl.errors import CheckpointError, ConfigError
from janusvl.loading.hf_layout import to_transformers_state_dict, transformers_config_dict
from janusvl.models.vq import VQModel

W, D, V, LAYERS = 1024, 64, 128, 2  # siglip_large width; tiny LLM


def tiny_config() -> JanusConfig:
    mlp = {"cls": "MlpProjector", "params": {"projector_type": "mlp_gelu", "depth": 2}}
    return JanusConfig.from_dict({
        "model_type": "multi_modality",
        # select_layer 2 keeps two of the 24 blocks; a 32-pixel image is a 2 x 2 grid.
        "vision_config": {"cls": "CLIPVisionTower", "params": {
            "model_name": "siglip_large_patch16_384", "image_size": 32, "select_layer": 2}},
        "aligner_config": {**mlp, "params": {**mlp["params"], "input_dim": W, "n_embed": D}},
        "gen_vision_config": {"cls": "VQ-16", "params": {
            "image_token_size": 512, "n_embed": 8, "base_channels": 32,
            "channel_multiplier": [1, 2], "z_channels": 64, "num_res_blocks": 1}},
        "gen_aligner_config": {**mlp, "params": {**mlp["params"], "input_dim": 8, "n_embed": D}},
        "gen_head_config": {"cls": "vision_head", "params": {
            "n_embed": D, "image_token_embed": D, "image_token_size": 512}},
        "language_config": {"vocab_size": V, "hidden_size": D, "intermediate_size": 96,
                            "num_hidden_layers": LAYERS, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "rope_theta": 5000.0},
    })


def deepseek_state_dict(cfg: JanusConfig) -> dict[str, torch.Tensor]:
    """Random tensors under every key a DeepSeek checkpoint of `cfg` holds (spec section 3)."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {}
    vt = "vision_model.vision_tower."
    n = cfg.vision_config.num_patches
    shapes |= {vt + "patch_embed.proj.weight": (W, 3, 16, 16), vt + "patch_embed.proj.bias": (W,),
               vt + "pos_embed": (1, n, W), vt + "norm.weight": (W,), vt + "norm.bias": (W,)}
    for i in range(cfg.vision_config.num_blocks):
        b = f"{vt}blocks.{i}."
        shapes |= {b + "norm1.weight": (W,), b + "norm1.bias": (W,), b + "attn.qkv.weight": (3 * W, W),
                   b + "attn.qkv.bias": (3 * W,), b + "attn.proj.weight": (W, W), b + "attn.proj.bias": (W,),
                   b + "norm2.weight": (W,), b + "norm2.bias": (W,), b + "mlp.fc1.weight": (4 * W, W),
                   b + "mlp.fc1.bias": (4 * W,), b + "mlp.fc2.weight": (W, 4 * W), b + "mlp.fc2.bias": (W,)}
    # timm's MAP head (AttentionPoolLatent); the converter must drop it whatever its parts.
    shapes |= {vt + "attn_pool.latent": (1, 1, W), vt + "attn_pool.q.weight": (W, W),
               vt + "attn_pool.kv.weight": (2 * W, W), vt + "attn_pool.mlp.fc1.weight": (4 * W, W)}
    for name, d_in in (("aligner", W), ("gen_aligner", 8)):
        shapes |= {f"{name}.layers.0.weight": (D, d_in), f"{name}.layers.0.bias": (D,),
                   f"{name}.layers.2.weight": (D, D), f"{name}.layers.2.bias": (D,)}
    shapes |= {"gen_head.output_mlp_projector.weight": (D, D), "gen_head.output_mlp_projector.bias": (D,),
               "gen_head.vision_head.weight": (512, D), "gen_head.vision_head.bias": (512,),
               "gen_embed.weight": (512, 8)}
    with torch.device("meta"):
        vq = VQModel(cfg.gen_vision_config).state_dict()
    shapes |= {f"gen_vision_model.{k}": tuple(t.shape) for k, t in vq.items()}
    shapes["gen_vision_model.quantize.codebook_used"] = (65536,)
    lm, kv = "language_model.model.", 2 * 16
    shapes |= {lm + "embed_tokens.weight": (V, D), lm + "norm.weight": (D,), "language_model.lm_head.weight": (V, D)}
    for i in range(LAYERS):
        b = f"{lm}layers.{i}."
        shapes |= {b + "self_attn.q_proj.weight": (D, D), b + "self_attn.k_proj.weight": (kv, D),
                   b + "self_attn.v_proj.weight": (kv, D), b + "self_attn.o_proj.weight": (D, D),
                   b + "mlp.gate_proj.weight": (96, D), b + "mlp.up_proj.weight": (96, D),
                   b + "mlp.down_proj.weight": (D, 96), b + "input_layernorm.weight": (D,),
                   b + "post_attention_layernorm.weight": (D,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_full_state_dict_loads_strictly_into_transformers() -> None:
    cfg = tiny_config()
    sd = deepseek_state_dict(cfg)
    out = to_transformers_state_dict(sd)
    model = transformers.JanusForConditionalGeneration(
        transformers.JanusConfig(**transformers_config_dict(cfg, image_token_id=7)))
    model.load_state_dict(out, strict=True)  # same keys, same shapes, nothing left over

    dropped = [k for k in sd if ".attn_pool." in k or k.endswith("codebook_used")]
    assert len(out) == len(sd) - len(dropped) + 2 * cfg.vision_config.num_blocks * 2  # qkv -> q, k, v
    m, vt = model.model, "vision_model.vision_tower."
    layer1 = m.vision_model.encoder.layers[1].self_attn
    qkv_w, qkv_b = sd[vt + "blocks.1.attn.qkv.weight"], sd[vt + "blocks.1.attn.qkv.bias"]
    for i, proj in enumerate((layer1.q_proj, layer1.k_proj, layer1.v_proj)):
        assert torch.equal(proj.weight, qkv_w[i * W:(i + 1) * W])
        assert torch.equal(proj.bias, qkv_b[i * W:(i + 1) * W])
    assert torch.equal(m.vision_model.embeddings.position_embedding.weight, sd[vt + "pos_embed"][0])
    assert torch.equal(m.vision_model.post_layernorm.bias, sd[vt + "norm.bias"])
    assert torch.equal(m.vision_model.encoder.layers[0].self_attn.projection_layer.weight,
                       sd[vt + "blocks.0.attn.proj.weight"])
    assert torch.equal(m.aligner.hidden_layers[0].weight, sd["aligner.layers.2.weight"])
    assert torch.equal(m.generation_aligner.fc1.bias, sd["gen_aligner.layers.0.bias"])
    assert torch.equal(m.generation_head.proj_out.weight, sd["gen_head.output_mlp_projector.weight"])
    assert torch.equal(m.generation_embeddings.weight, sd["gen_embed.weight"])
    assert torch.equal(m.vqmodel.decoder.mid.attn_1.q.weight, sd["gen_vision_model.decoder.mid.1.q.weight"])
    assert torch.equal(m.vqmodel.encoder.mid.block_2.conv2.bias, sd["gen_vision_model.encoder.mid.2.conv2.bias"])
    assert torch.equal(m.vqmodel.decoder.up[0].attn[1].proj_out.weight,
                       sd["gen_vision_model.decoder.conv_blocks.0.attn.1.proj_out.weight"])
    assert torch.equal(m.language_model.layers[1].mlp.down_proj.weight,
                       sd["language_model.model.layers.1.mlp.down_proj.weight"])
    # Untied: lm_head keeps its own weights (a tied head would be overwritten by embed_tokens).
    assert torch.equal(model.lm_head.weight, sd["language_model.lm_head.weight"])
    assert torch.equal(m.language_model.embed_tokens.weight, sd["language_model.model.embed_tokens.weight"])

    tc = model.config.text_config
    assert (tc.head_dim, tc.num_key_value_heads, tc.rope_parameters["rope_theta"]) == (16, 2, 5000.0)
    assert model.config.image_token_id == 7 and model.config.vq_config.num_patches == 2


@pytest.mark.parametrize("key", [
    "vision_model.vision_tower.blocks.0.attn.qkv.scale",
    "vision_model.vision_tower.cls_token",
    "aligner.layers.1.weight",  # odd indices are GELUs
    "gen_vision_model.quantize.codebook_sum",
    "gen_vision_model.decoder.conv_blocks.0.res.0.conv_shortcut.weight",
    "gen_vision_model.encoder.mid.3.norm1.weight",
    "language_model.model.layers.0.self_attn.rotary_emb.inv_freq",
    "lm_head.weight",
])
def test_unknown_key_is_an_error_naming_it(key: str) -> None:
    sd = deepseek_state_dict(tiny_config())
    sd[key] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        to_transformers_state_dict(sd)


def test_bad_shapes_are_errors() -> None:
    with pytest.raises(CheckpointError, match="pos_embed"):
        to_transformers_state_dict({"vision_model.vision_tower.pos_embed": torch.zeros(4, 1024)})
    with pytest.raises(CheckpointError, match="multiple of 3"):
        to_transformers_state_dict({"vision_model.vision_tower.blocks.0.attn.qkv.bias": torch.zeros(10)})


def test_config_dict_matches_deepseek_sizes() -> None:
    d = transformers_config_dict(JanusConfig(), image_token_id=100581)
    assert d["tie_word_embeddings"] is False and d["text_config"]["tie_word_embeddings"] is False
    v, vq = d["vision_config"], d["vq_config"]
    assert (v["num_hidden_layers"], v["projection_dim"], v["depth"]) == (24, 2048, 2)
    assert (vq["projection_dim"], vq["image_token_embed_dim"], vq["num_embeddings"]) == (2048, 2048, 16384)
    # transformers sizes the vision MLP as int(width * mlp_ratio); so400m's 4304 / 1152 must survive.
    assert int(v["hidden_size"] * v["mlp_ratio"]) == 4096
    so400m = JanusConfig(vision_config=VisionConfig(model_name="siglip_so400m_patch14_384"),
                         aligner_config=AlignerConfig(input_dim=1152))
    v = transformers_config_dict(so400m, 0)["vision_config"]
    assert int(v["hidden_size"] * v["mlp_ratio"]) == VISION_MODELS["siglip_so400m_patch14_384"].mlp_hidden


def test_config_dict_rejects_what_transformers_cannot_express() -> None:
    cfg = tiny_config()
    bad = replace(cfg, gen_head_config=replace(cfg.gen_head_config, image_token_embed=D + 32))
    with pytest.raises(ConfigError, match="image_token_embed"):
        transformers_config_dict(bad, 0)
    linear = replace(cfg, aligner_config=replace(cfg.aligner_config, projector_type="linear"))
    with pytest.raises(ConfigError, match="projector_type"):
        transformers_config_dict(linear, 0)
