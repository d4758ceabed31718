"""VQ-16, the image tokenizer Janus generates with (`gen_vision_model`).

This follows LlamaGen's VQ model (Sun et al. 2024, "Autoregressive Model Beats Diffusion"), itself
the taming-transformers VQGAN encoder/decoder with an L2-normalised codebook. Module names give
DeepSeek's state-dict keys exactly, so a checkpoint loads with no renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import GenVisionConfig
from .layers import Conv2d, Embedding, bmm
from .steps import Steps, finish


def swish(x: torch.Tensor) -> torch.Tensor:
    # LlamaGen's x * sigmoid(x), in this order: F.silu rounds differently and the decoder amplifies it.
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, channels as the head dimension."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # LlamaGen's exact op order (bmm, scale, softmax, bmm), so results match it bit for bit.
        q = self.q(h).reshape(B, C, H * W).permute(0, 2, 1)  # [B, HW, C]
        k = self.k(h).reshape(B, C, H * W)  # [B, C, HW]
        w = torch.softmax(bmm(q, k) * (int(C) ** (-0.5)), dim=2)  # [B, HW(q), HW(k)]
        v = self.v(h).reshape(B, C, H * W)
        o = bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)
        return self.proj_out(o).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric zero padding (right and bottom only), which Conv2d's padding cannot express.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `res.j` ResBlocks, each followed by `attn.j` when the level has attention,
    then an optional resampler stored as `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, c_in: int, c_out: int, n_res: int, attn: bool,
                 resample: type[Downsample] | type[Upsample] | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c_in if j == 0 else c_out, c_out) for j in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_res if attn else 0))
        self.resample_name = resample.__name__.lower() if resample else None
        if resample:
            setattr(self, self.resample_name, resample(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return finish(self.forward_steps(x))

    def forward_steps(self, x: torch.Tensor) -> Steps[torch.Tensor]:
        """`forward`, yielding before each block (a 384 x 384 block takes ~0.5 s on a CPU)."""
        for j, res in enumerate(self.res):
            yield
            x = res(x)
            if self.attn:
                x = self.attn[j](x)
        if self.resample_name:
            yield
            x = getattr(self, self.resample_name)(x)
        return x


def _mid(channels: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels), AttnBlock(channels), ResBlock(channels, channels))


class Encoder(nn.Module):
    def __init__(self, cfg: GenVisionConfig) -> None:
        super().__init__()
        ch, mult, n = cfg.base_channels, cfg.channel_multiplier, len(cfg.channel_multiplier)
        self.conv_in = Conv2d(3, ch, 3, padding=1)
        c_ins = (1, *mult[:-1])  # level i reads what level i-1 wrote
        self.conv_blocks = nn.ModuleList(
            Level(ch * c_ins[i], ch * mult[i], cfg.num_res_blocks, attn=i == n - 1,
                  resample=Downsample if i < n - 1 else None)
            for i in range(n)
        )
        c = ch * mult[-1]
        self.mid = _mid(c)
        self.norm_out = _norm(c)
        self.conv_out = Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.conv_blocks:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(swish(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: GenVisionConfig) -> None:
        super().__init__()
        ch, mult, n = cfg.base_channels, cfg.channel_multiplier, len(cfg.channel_multiplier)
        c = ch * mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        # Levels run from the lowest resolution (multiplier mult[-1], the only one with attention) up.
        levels = []
        for i, m in enumerate(reversed(mult)):
            levels.append(Level(c, ch * m, cfg.num_res_blocks + 1, attn=i == 0,
                                resample=Upsample if i < n - 1 else None))
            c = ch * m
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return finish(self.forward_steps(z))

    def forward_steps(self, z: torch.Tensor) -> Steps[torch.Tensor]:
        x = self.mid(self.conv_in(z))
        for level in self.conv_blocks:
            x = yield from level.forward_steps(x)
        yield
        return self.conv_out(swish(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup, with codebook rows and features both L2-normalised."""

    def __init__(self, n_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = Embedding(n_codes, dim)
        # The checkpoint's `codebook_used` (a training statistic) gets no home here: the loader
        # drops it by name (janusvl.loading.checkpoint.UNUSED_KEYS).

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[b, c, h, w] features -> [b, h*w] code ids (row-major over the grid)."""
        B = z.shape[0]
        z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)  # [b*h*w, c]
        e = F.normalize(self.embedding.weight, dim=-1)
        # LlamaGen's squared distance, kept term by term so ties break exactly as upstream.
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
        return d.argmin(dim=1).view(B, -1)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Sequence[int] | None = None,
                           channel_first: bool = True) -> torch.Tensor:
        """Normalised codebook rows for `indices`; `shape` is [b, c, h, w] if channel_first, else
        [b, h, w, c]. Without `shape` the rows come back as [..., c]."""
        z = F.normalize(self.embedding(indices), dim=-1)  # normalising rows after lookup = before
        if shape is None:
            return z
        if channel_first:
            b, c, h, w = shape
            return z.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return z.view(*shape)


class VQModel(nn.Module):
    def __init__(self, cfg: GenVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.image_token_size, cfg.n_embed)
        self.quant_conv = Conv2d(cfg.z_channels, cfg.n_embed, 1)
        self.post_quant_conv = Conv2d(cfg.n_embed, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] pixels in [-1, 1] -> [b, (H/16)*(W/16)] code ids, row-major over the grid."""
        return self.quantize(self.quant_conv(self.encoder(pixels.to(self.dtype))))

    @torch.no_grad()
    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """[b, n_embed, h, w] latents -> [b, 3, 16h, 16w] pixels, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(quant.to(self.dtype)))

    @torch.no_grad()
    def decode_code(self, code_b: torch.Tensor, shape: Sequence[int] | None = None,
                    channel_first: bool = True) -> torch.Tensor:
        """DeepSeek's API: `decode_code(ids, shape=[b, n_embed, 24, 24])` -> [b, 3, 384, 384]."""
        return finish(self.decode_code_steps(code_b, shape, channel_first))

    def decode_code_steps(self, code_b: torch.Tensor, shape: Sequence[int] | None = None,
                          channel_first: bool = True) -> Steps[torch.Tensor]:
        """`decode_code` in pieces (one decoder block per step), for the serving engine."""
        quant = self.quantize.get_codebook_entry(code_b, shape, channel_first)
        return (yield from self.decoder.forward_steps(self.post_quant_conv(quant.to(self.dtype))))


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[b, 3, H, W] decoder output in [-1, 1] -> RGB images, converted as DeepSeek's
    generation_inference.py does: float32, clip((x + 1) / 2 * 255, 0, 255), truncate to uint8."""
    x = pixels.detach().to(torch.float32).cpu().numpy().transpose(0, 2, 3, 1)
    x = np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8)  # astype truncates, like upstream's assignment
    return [Image.fromarray(img) for img in x]
