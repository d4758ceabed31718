"""SigLIP vision tower in timm's VisionTransformer layout, as DeepSeek's `CLIPVisionTower` wraps it.

No class token; learned absolute position embeddings; pre-norm blocks with a fused qkv projection;
a final LayerNorm. The checkpoint also carries a MAP pooling head (`attn_pool.*`) that the Janus
pipeline never runs: the loader drops those keys by name, so no module is built for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import Conv2d, Linear, attention
from .steps import Steps, finish


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, hd]
        x = attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.proj = Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [B, N, W]


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        spec = cfg.spec
        self.patch_embed = PatchEmbed(spec.width, spec.patch_size)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches, spec.width))
        self.blocks = nn.ModuleList(
            Block(spec.width, spec.heads, spec.mlp_hidden) for _ in range(cfg.num_blocks)
        )
        self.norm = nn.LayerNorm(spec.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return finish(self.forward_steps(pixels))

    def forward_steps(self, pixels: torch.Tensor) -> Steps[torch.Tensor]:
        """`forward` in pieces: yields before each block, so a scheduler can run other work
        between blocks (a whole tower takes seconds on a CPU); returns forward's result."""
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            yield
            x = block(x)
        return self.norm(x)


class CLIPVisionTower(nn.Module):
    """`vision_model`: pixels [B, 3, S, S] -> patch features [B, N, W]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.vision_tower = VisionTransformer(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixels)

    def forward_steps(self, pixels: torch.Tensor) -> Steps[torch.Tensor]:
        return self.vision_tower.forward_steps(pixels)
