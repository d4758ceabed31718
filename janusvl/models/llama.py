"""The LLaMA decoder Janus uses as `language_model`, with the module names of transformers'
`LlamaForCausalLM` (so checkpoint keys load one to one) and the numerics of its reference code:
RMSNorm in fp32 then cast, rotate-half RoPE computed in fp32, SDPA attention, SwiGLU MLP.

Calls take embeddings (DeepSeek's pipeline never passes ids to the decoder) or ids, an optional
padding mask, and a `KVCache` that the caller owns or that is created on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LanguageConfig
from .kv_cache import KVCache, RaggedBatch, decode_valid
from .layers import Embedding, Linear


@dataclass
class BaseModelOutput:
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    past_key_values: KVCache | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.kernel = None  # janusvl's kernels, set by janusvl.models.fast.optimize: one call, not seven

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype == self.weight.dtype and x.device.type == "cpu":
            return self.kernel.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] for integer positions [B, T], computed in fp32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions[:, :, None].float() * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [B, T, hd]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)
        # Set by janusvl.models.fast: one GEMM for q, k and v (the three projections are then gone),
        # and janusvl's kernels for the rotary embedding (one call per tensor, the same values).
        self.qkv_proj: nn.Module | None = None
        self.kernel = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | RaggedBatch,
        mask: torch.Tensor | list[torch.Tensor | None] | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.heads, self.head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kernel is not None and q.dtype == rope[0].dtype and q.device.type == "cpu":
            q, k = self.kernel.rope(q, *rope).transpose(1, 2), self.kernel.rope(k, *rope).transpose(1, 2)
        else:
            q, k = apply_rope(q.transpose(1, 2), *rope), apply_rope(k.transpose(1, 2), *rope)
        out = cache.attend(self.layer, q, k, v, mask, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by janusvl.models.fast: gate and up in one GEMM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | RaggedBatch,
                mask: torch.Tensor | list[torch.Tensor | None] | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def step_operands(self) -> list[list[torch.Tensor]] | None:
        """This layer as the kernels' one-call decode step takes it ({norm, norm, qkv, o, gate_up,
        down}, each projection's kernel operands), or None when any part of it runs elsewhere."""
        attn, mlp = self.self_attn, self.mlp
        if attn.kernel is None or self.input_layernorm.kernel is None or self.post_attention_layernorm.kernel is None:
            return None
        if attn.qkv_proj is None or mlp.gate_up_proj is None:
            return None
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        operands = [getattr(p, "step_operands", lambda: None)() for p in projections]
        if any(o is None for o in operands):
            return None
        return [[self.input_layernorm.weight], [self.post_attention_layernorm.weight], *operands]


class LlamaModel(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def new_cache(self, batch: int, capacity: int, growable: bool = False) -> KVCache:
        cfg = self.config
        weight = self.embed_tokens.weight
        return KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim,
                       capacity, weight.dtype, weight.device, growable=growable)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | RaggedBatch | None = None,
        use_cache: bool | None = None,
        **_: object,
    ) -> BaseModelOutput:
        """Run new tokens through the decoder. `attention_mask` [B, T] (or [B, past+T], as HF
        callers pass it) marks real tokens; `past_key_values` continues an earlier call.
        `position_ids` default to the cache offset onwards, as in transformers' forward; the
        generation code passes padding-aware positions, as transformers' generate does. A
        `RaggedBatch` of caches (the serving engine's continuous batch) continues each cache at its own length."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        cache = past_key_values
        if cache is None:
            cache = self.new_cache(B, max(T, 16), growable=True)
        cache.reserve(T)
        if attention_mask is None:
            mask_new = torch.ones(B, T, dtype=torch.bool, device=x.device)
        else:
            mask_new = attention_mask[:, -T:].to(device=x.device, dtype=torch.bool)
        cache.append_mask(mask_new)
        if position_ids is None and isinstance(cache, RaggedBatch):
            position_ids = cache.next_positions()
        if position_ids is None:
            position_ids = torch.arange(cache.length, cache.length + T, device=x.device).expand(B, T)
        positions = position_ids.to(x.device)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = cache.attention_mask(T)
        stepped = self._decode_in_one_call(x, rope, cache, mask) if T == 1 else None
        if stepped is not None:
            x = stepped
        else:
            for layer in self.layers:
                x = layer(x, rope, cache, mask)
        cache.advance(T)
        return BaseModelOutput(self.norm(x), cache if use_cache or past_key_values is not None else None)

    def _decode_in_one_call(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                            cache: KVCache | RaggedBatch, mask: torch.Tensor | list[torch.Tensor | None] | None,
                            ) -> torch.Tensor | None:
        """Every layer of a decode step (one token per row) in one kernel call, where the layers'
        kernels are janusvl's own (set by janusvl.models.fast.optimize on CPUs that emulate bf16):
        the same kernels in the same order as the layers' forward, without ~30 Python-dispatched
        ops per layer. None where any layer or cache is not of that kind."""
        kernel = self.layers[0].self_attn.kernel if len(self.layers) else None
        if kernel is None or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != self.norm.weight.dtype:
            return None
        caches, masks = (cache.caches, mask) if isinstance(cache, RaggedBatch) else ([cache], [mask])
        if any(c.k[0].dtype != x.dtype for c in caches):
            return None
        layers = [layer.step_operands() for layer in self.layers]
        if any(layer is None for layer in layers):
            return None
        cfg = self.config
        return kernel.decode_layers(x, *rope, layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                                    cfg.rms_norm_eps, [c.k for c in caches], [c.v for c in caches],
                                    [decode_valid(m) for m in masks], [c.length for c in caches])


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Set by janusvl.models.fast.optimize or a pre-quantised checkpoint's loader.
        self.kernel = "torch"
        self.quantization: str | None = None  # "int8" or "int4" once the projections are quantised

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: object,
    ) -> CausalLMOutput:
        """Logits [B, T, vocab] (only the last `logits_to_keep` positions when it is > 0)."""
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return CausalLMOutput(self.lm_head(h), out.past_key_values)

    def generate(self, **kwargs: object) -> torch.Tensor:
        """DeepSeek's call: new token ids [B, n]; see `janusvl.generation.text.generate`."""
        from ..generation.text import generate

        return generate(self, **kwargs)
