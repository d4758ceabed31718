"""Write random Janus checkpoints in DeepSeek's published layout.

Tests and the demo use `tiny` (a few tens of MB, written in about a second); benchmarks use
`pro-1b`, the shape of Janus-Pro-1B at full size. Every file a real checkpoint has is written:
config.json, both processor configs, tokenizer files and weights in any of the four layouts,
including the key groups the pipeline never runs (`attn_pool.*`, `quantize.codebook_used`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import JanusConfig
from .tokenizer import write_processor_configs, write_tokenizer

WEIGHT_LAYOUTS = ("safetensors", "sharded-safetensors", "bin", "sharded-bin")


def _section(cls: str, **params: object) -> dict[str, object]:
    return {"cls": cls, "model_type": cls.lower(), "params": params}


def config_dict(size: str, vocab_size: int, dtype: str = "bfloat16", image_size: int = 384,
                language: dict[str, object] | None = None) -> dict[str, object]:
    """A DeepSeek-format config.json for `size` in {"tiny", "pro-1b", "pro-7b"}; `image_size`
    sets the image grid (both towers), `language` overrides language_config keys."""
    if size == "tiny":
        D = 64
        base_language = {"hidden_size": D, "intermediate_size": 160, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 4,
                         "vocab_size": vocab_size, "max_position_embeddings": 4096}
        # Two real SigLIP-L blocks (select_layer=2) and a narrow VQ decoder keep it small.
        vision = {"select_layer": 2}
        gen_vision = {"base_channels": 32, "z_channels": 64}
    elif size == "pro-1b":
        D = 2048
        base_language = {"hidden_size": D, "intermediate_size": 5632, "num_hidden_layers": 24,
                         "num_attention_heads": 16, "num_key_value_heads": 16,
                         "vocab_size": 102400, "max_position_embeddings": 16384}
        vision, gen_vision = {"select_layer": -1}, {}
    elif size == "pro-7b":  # as published: the LLaMA defaults fill in the rest
        D = 4096
        base_language = {"num_hidden_layers": 30, "vocab_size": 102400, "max_position_embeddings": 16384}
        vision, gen_vision = {"select_layer": -1}, {}
    else:
        raise ValueError(f"unknown checkpoint size {size!r}; use tiny, pro-1b or pro-7b")
    return {
        "model_type": "multi_modality",
        "torch_dtype": dtype,
        "vision_config": _section("CLIPVisionTower", model_name="siglip_large_patch16_384",
                                  image_size=image_size, select_feature="same", **vision),
        "aligner_config": _section("MlpProjector", projector_type="mlp_gelu", depth=2,
                                   input_dim=1024, n_embed=D),
        "gen_vision_config": _section("VQ-16", image_token_size=16384, n_embed=8, **gen_vision),
        "gen_aligner_config": _section("MlpProjector", projector_type="mlp_gelu", depth=2,
                                       input_dim=8, n_embed=D),
        "gen_head_config": _section("vision_head", image_token_embed=D, image_token_size=16384, n_embed=D),
        "language_config": {"model_type": "llama", "torch_dtype": dtype, **base_language,
                            **(language or {})},
    }


def _unused_shapes(config: JanusConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the MAP pooling head and the codebook usage counter (timm / LlamaGen)."""
    spec = config.vision_config.spec
    W, hidden = spec.width, int(spec.width * 4.0)
    p = "vision_model.vision_tower.attn_pool."
    return {
        p + "latent": (1, 1, W),
        p + "q.weight": (W, W), p + "q.bias": (W,),
        p + "kv.weight": (2 * W, W), p + "kv.bias": (2 * W,),
        p + "proj.weight": (W, W), p + "proj.bias": (W,),
        p + "norm.weight": (W,), p + "norm.bias": (W,),
        p + "mlp.fc1.weight": (hidden, W), p + "mlp.fc1.bias": (hidden,),
        p + "mlp.fc2.weight": (W, hidden), p + "mlp.fc2.bias": (W,),
        "gen_vision_model.quantize.codebook_used": (65536,),
    }


def random_state_dict(config: JanusConfig, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every key of a checkpoint, scaled so activations stay in a sane range."""
    from ..models.janus import MultiModalityCausalLM

    with torch.device("meta"):
        model = MultiModalityCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update(_unused_shapes(config))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("codebook_used"):
            state[key] = torch.zeros(shape, dtype=dtype)
            continue
        t = torch.randn(shape, generator=gen)
        name = key.rsplit(".", 1)[-1]
        is_norm = "norm" in key or "layernorm" in key
        if is_norm and name == "weight":
            t = 1.0 + 0.1 * t
        elif name == "bias" or key.endswith(("pos_embed", "latent")):
            t = 0.05 * t
        elif key.endswith(("embed_tokens.weight", "gen_embed.weight", "quantize.embedding.weight")):
            t = 0.5 * t
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            t = t / math.sqrt(fan_in)
        state[key] = t.to(dtype)
    return state


def _shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split keys, in order, into n groups of roughly equal byte size."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    seen = 0
    for key, t in state.items():
        shards[min(n - 1, seen * n // max(total, 1))][key] = t
        seen += t.numel() * t.element_size()
    return [s for s in shards if s]


def save_weights(state: dict[str, torch.Tensor], dst: Path, layout: str, shards: int = 2) -> list[Path]:
    """Write `state` in one of WEIGHT_LAYOUTS; returns the files written."""
    from safetensors.torch import save_file

    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; use one of {WEIGHT_LAYOUTS}")
    safetensors = layout.endswith("safetensors")
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")

    def write(part: dict[str, torch.Tensor], path: Path) -> None:
        if safetensors:
            save_file({k: v.contiguous() for k, v in part.items()}, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)

    if not layout.startswith("sharded"):
        path = dst / f"{stem}.{ext}"
        write(state, path)
        return [path]
    parts = _shards(state, shards)
    files, weight_map = [], {}
    for i, part in enumerate(parts, 1):
        path = dst / f"{stem}-{i:05d}-of-{len(parts):05d}.{ext}"
        write(part, path)
        files.append(path)
        weight_map.update({k: path.name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return files


def write_checkpoint(
    dst: str | Path,
    size: str = "tiny",
    layout: str = "safetensors",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    roles: str = "pro",
    config_dtype: torch.dtype | None = None,
    image_size: int = 384,
    language: dict[str, object] | None = None,
) -> Path:
    """Write a random Janus checkpoint directory at `dst` and return its path. config.json's
    `torch_dtype` names `config_dtype` when given (it may differ from the weights'), else `dtype`.
    `image_size` and `language` are passed to `config_dict` (a smaller image grid; language_config
    overrides)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(dst, roles=roles)
    dtype_name = str(config_dtype or dtype).removeprefix("torch.")
    data = config_dict(size, vocab_size=int(math.ceil(vocab / 64) * 64), dtype=dtype_name,
                       image_size=image_size, language=language)
    (dst / "config.json").write_text(json.dumps(data, indent=2))
    write_processor_configs(dst, image_size)
    config = JanusConfig.from_dict(data)
    save_weights(random_state_dict(config, dtype, seed), dst, layout)
    return dst
