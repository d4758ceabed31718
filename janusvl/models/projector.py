"""The MLP aligners that map vision features (and VQ code embeddings) into the LLM's width."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AlignerConfig
from .layers import Linear


class MlpProjector(nn.Module):
    """`layers` is a Sequential so checkpoint keys read `layers.0`, `layers.2`, ... (odd indices are GELUs)."""

    def __init__(self, cfg: AlignerConfig) -> None:
        super().__init__()
        if cfg.projector_type == "identity":
            self.layers: nn.Module = nn.Identity()
        elif cfg.projector_type == "linear":
            self.layers = Linear(cfg.input_dim, cfg.n_embed)
        else:  # mlp_gelu
            modules: list[nn.Module] = [Linear(cfg.input_dim, cfg.n_embed)]
            for _ in range(1, cfg.depth):
                modules += [nn.GELU(), Linear(cfg.n_embed, cfg.n_embed)]
            self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionHead(nn.Module):
    """`gen_head`: LLM hidden state -> logits over the VQ codebook."""

    def __init__(self, n_embed: int, image_token_embed: int, image_token_size: int) -> None:
        super().__init__()
        self.output_mlp_projector = Linear(n_embed, image_token_embed)
        self.vision_activation = nn.GELU()
        self.vision_head = Linear(image_token_embed, image_token_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.vision_activation(self.output_mlp_projector(x)))
