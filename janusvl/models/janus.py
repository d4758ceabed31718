"""`MultiModalityCausalLM`: DeepSeek's Janus as one module whose attribute names are the
checkpoint's top-level keys. All image/text merging lives in `prepare_inputs_embeds`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import JanusConfig
from ..errors import InputError
from .layers import Embedding
from .llama import LlamaForCausalLM
from .projector import MlpProjector, VisionHead
from .siglip import CLIPVisionTower
from .steps import Steps, finish
from .vq import VQModel


class MultiModalityCausalLM(nn.Module):
    def __init__(self, config: JanusConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTower(config.vision_config)
        self.aligner = MlpProjector(config.aligner_config)
        self.gen_vision_model = VQModel(config.gen_vision_config)
        self.gen_aligner = MlpProjector(config.gen_aligner_config)
        head = config.gen_head_config
        self.gen_head = VisionHead(head.n_embed, head.image_token_embed, head.image_token_size)
        gen = config.gen_vision_config
        self.gen_embed = Embedding(gen.image_token_size, gen.n_embed)
        self.language_model = LlamaForCausalLM(config.language_config)

    @classmethod
    def from_pretrained(
        cls, model_path: str | Path, device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None, **kwargs: object,
    ) -> MultiModalityCausalLM:
        """Load a DeepSeek-layout checkpoint (local directory or Hub id) as DeepSeek's code does:
        float32 on the CPU unless `dtype` / `device` say otherwise (dtype "auto" keeps the
        checkpoint's own). transformers' argument names are accepted too; see `janusvl.auto`."""
        from ..auto import deepseek_from_pretrained

        return deepseek_from_pretrained("MultiModalityCausalLM.from_pretrained", model_path,
                                        device=device, dtype=dtype, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [n, 3, S, S] -> aligned image embeddings [n, N, D]."""
        return finish(self.encode_images_steps(pixel_values))

    def encode_images_steps(self, pixel_values: torch.Tensor) -> Steps[torch.Tensor]:
        """`encode_images` in pieces (one vision block per step), for the serving engine."""
        weight = self.vision_model.vision_tower.patch_embed.proj.weight
        features = yield from self.vision_model.forward_steps(pixel_values.to(weight.device, weight.dtype))
        return self.aligner(features)

    def prepare_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        images_seq_mask: torch.Tensor,
        images_emb_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        """Text embeddings [b, T, D] with each image's aligned features written, in order, at the
        image-token positions. Only the real images are encoded (one batched vision pass); the
        inputs are not modified. `image_features` [k, N, D], the real images' `encode_images`
        output in (b, n) order, skips the vision pass (the server's cache of features)."""
        embed = self.language_model.get_input_embeddings()
        inputs_embeds = embed(input_ids.clamp(min=0).to(embed.weight.device))
        seq_mask = images_seq_mask.to(inputs_embeds.device, torch.bool)
        emb_mask = images_emb_mask.to(inputs_embeds.device, torch.bool)  # [b, n, N]
        n_slots, n_tokens = int(seq_mask.sum()), int(emb_mask.sum())
        if n_slots != n_tokens:
            raise InputError(
                f"images_seq_mask marks {n_slots} image positions but images_emb_mask selects "
                f"{n_tokens} image embeddings; they must agree"
            )
        if n_tokens == 0:
            return inputs_embeds
        real = emb_mask.any(-1)  # [b, n]: which image slots hold an image
        if image_features is None:
            image_features = self.encode_images(pixel_values.to(inputs_embeds.device)[real])  # [k, N, D]
        elif image_features.shape[0] != int(real.sum()):
            raise InputError(f"image_features holds {image_features.shape[0]} images, the masks "
                             f"mark {int(real.sum())}")
        features = image_features.to(inputs_embeds.device)
        rows = features[emb_mask[real]]  # [n_tokens, D] in (b, n, t) order
        inputs_embeds[seq_mask] = rows.to(inputs_embeds.dtype)
        return inputs_embeds

    def prepare_gen_img_embeds(self, image_ids: torch.Tensor) -> torch.Tensor:
        """VQ code ids [...] -> LLM input embeddings [..., D] for image generation."""
        return self.gen_aligner(self.gen_embed(image_ids))
