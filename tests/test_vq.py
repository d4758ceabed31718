"""VQ-16 against transformers' JanusVQVAE, after our weights pass through our own key converter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers  # the oracle: a test dependency, so a missing one fails rather than skips

from conftest import rel_error
from janusvl.config import GenHeadConfig, GenVisionConfig, JanusConfig
from janusvl.loading.hf_layout import to_transformers_state_dict, transformers_config_dict
from janusvl.models.vq import VQModel, pixels_to_pil

# GroupNorm(32) needs every width divisible by 32; five levels keep the real 16x downsampling.
SMALL = GenVisionConfig(image_token_size=512, n_embed=8, base_channels=32,
                        channel_multiplier=(1, 1, 2, 2, 4), z_channels=64, num_res_blocks=2)
GRID = 24


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights with non-trivial norm scales and biases, so a skipped bias or affine shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.dim() == 1 and ".norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * r)
        elif name.endswith("bias"):
            p.copy_(0.1 * r)
        elif name.endswith("embedding.weight"):
            p.copy_(r)
        else:
            p.copy_(r / math.sqrt(p[0].numel()))
    return model


def hf_vqvae(sd: dict[str, torch.Tensor], grid: int = GRID) -> torch.nn.Module:
    """transformers' JanusVQVAE holding our weights, renamed by our converter, loaded strictly."""
    cfg = JanusConfig(gen_vision_config=SMALL, gen_head_config=GenHeadConfig(image_token_size=512))
    kwargs = transformers_config_dict(cfg, image_token_id=0)["vq_config"]
    hf = transformers.JanusVQVAE(transformers.JanusVQVAEConfig(**kwargs, num_patches=grid)).eval()
    converted = to_transformers_state_dict({f"gen_vision_model.{k}": v for k, v in sd.items()})
    prefix = "model.vqmodel."
    assert all(k.startswith(prefix) for k in converted)
    hf.load_state_dict({k[len(prefix):]: v for k, v in converted.items()}, strict=True)
    return hf


@pytest.fixture(scope="module")
def models() -> tuple[VQModel, torch.nn.Module]:
    ours = randomize_(VQModel(SMALL), seed=0).eval()
    return ours, hf_vqvae(ours.state_dict())


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


# Both sides use LlamaGen's op order (bmm attention, x * sigmoid(x)), so float32 agrees to rounding
# noise far below what a structural bug gives (~1e-2 of the output scale).
TOL = {torch.float64: 1e-10, torch.float32: 1e-6}


def test_module_names_are_deepseek_keys() -> None:
    with torch.device("meta"):
        sd = VQModel(GenVisionConfig()).state_dict()  # the real sizes
    for key, shape in {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.4.attn.1.proj_out.bias": (512,),
        "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "quantize.embedding.weight": (16384, 8),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.mid.2.conv2.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.0.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.conv_blocks.4.res.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    # Attention only at the lowest resolution, no resampler after the last level, 2 + 3 res blocks.
    assert not any(k.startswith(("encoder.conv_blocks.3.attn", "decoder.conv_blocks.1.attn")) for k in sd)
    assert not any(".conv_blocks.4.downsample" in k or ".conv_blocks.4.upsample" in k for k in sd)
    assert "encoder.conv_blocks.0.res.2.conv1.weight" not in sd
    # One-to-one with transformers' VQ model (our keys -> its keys), nothing left over either side.
    ours = set(to_transformers_state_dict({f"gen_vision_model.{k}": v for k, v in sd.items()}))
    with torch.device("meta"):
        theirs = transformers.JanusVQVAE(transformers.JanusVQVAEConfig()).state_dict()
    assert ours == {f"model.vqmodel.{k}" for k in theirs}
    # The checkpoint's codebook_used (a training statistic) is dropped by the loader, not modelled.
    assert "quantize.codebook_used" not in sd and len(sd) == len(theirs)


def test_meta_build_then_assign_load(models: tuple[VQModel, torch.nn.Module]) -> None:
    src, _ = models
    with torch.device("meta"):
        m = VQModel(SMALL)
    m.load_state_dict(src.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    codes = torch.randint(0, SMALL.image_token_size, (1, 4 * 4), generator=torch.Generator().manual_seed(3))
    shape = [1, SMALL.n_embed, 4, 4]
    assert torch.equal(m.decode_code(codes, shape), src.decode_code(codes, shape))


# float64 on an 8 x 8 grid keeps the test fast; float32 decodes the real 24 x 24 grid.
@pytest.mark.parametrize(("dtype", "grid"), [(torch.float64, 8), (torch.float32, GRID)])
def test_decode_code_matches_transformers(models: tuple[VQModel, torch.nn.Module], dtype: torch.dtype,
                                          grid: int) -> None:
    ours = copy.deepcopy(models[0]).to(dtype)
    hf = (models[1] if grid == GRID else hf_vqvae(ours.state_dict(), grid)).to(dtype)
    codes = torch.randint(0, SMALL.image_token_size, (2, grid * grid), generator=torch.Generator().manual_seed(1))
    out = ours.decode_code(codes, shape=[2, SMALL.n_embed, grid, grid])
    with torch.no_grad():
        ref = hf.decode(codes)
    assert out.shape == (2, 3, 16 * grid, 16 * grid) and out.dtype == dtype
    assert ref.std() > 0.1  # the comparison below is not between near-constant images
    assert close(out, ref, TOL[dtype])
    images = pixels_to_pil(out)
    assert [(im.mode, im.size) for im in images] == [("RGB", (16 * grid, 16 * grid))] * 2
    assert len({im.tobytes() for im in images}) == 2


def test_codebook_entry_layouts(models: tuple[VQModel, torch.nn.Module]) -> None:
    q = models[0].quantize
    ids = torch.tensor([[5, 7, 5, 0, 511, 3]])  # b=1 on a 2x3 grid
    first = q.get_codebook_entry(ids, shape=[1, 8, 2, 3])
    last = q.get_codebook_entry(ids, shape=[1, 2, 3, 8], channel_first=False)
    rows = q.embedding.weight[ids[0]]
    expected = (rows / rows.norm(dim=1, keepdim=True)).view(1, 2, 3, 8)  # [b, h, w, c]
    assert torch.allclose(last, expected, atol=1e-6)
    assert torch.equal(first, last.permute(0, 3, 1, 2))
    assert first.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encoder_and_codes_match_transformers(models: tuple[VQModel, torch.nn.Module], dtype: torch.dtype) -> None:
    ours, hf = (copy.deepcopy(m).to(dtype) for m in models)
    pixels = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2), dtype=dtype) * 2 - 1
    with torch.no_grad():
        h = ours.encoder(pixels)
        ref = hf.encoder(pixels)
        assert close(h, ref, TOL[dtype])
        z = hf.quant_conv(ref)  # [2, 8, 8, 8]
    # LlamaGen picks the codebook row with the highest cosine similarity (both sides normalised).
    # transformers' own quantizer compares unnormalised vectors, so its ids are not the reference.
    sim = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=1) @ F.normalize(hf.quantize.embedding.weight, dim=1).t()
    codes = ours.encode(pixels)
    assert codes.shape == (2, 64) and codes.dtype == torch.long
    assert torch.equal(codes.flatten(), sim.argmax(dim=1))
    assert codes.unique().numel() > 10


def test_bf16_decodes_in_bf16_as_transformers_does(models: tuple[VQModel, torch.nn.Module]) -> None:
    """bf16 weights decode in bf16, as close to fp32 as transformers' JanusVQVAE in bf16 is. On a
    6 x 6 grid: transformers' bf16 convolutions take ~2 minutes at 24 x 24 on CPUs without bf16."""
    ours, _ = models
    grid = 6
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    hf = hf_vqvae(ours.state_dict(), grid)
    codes = torch.randint(0, SMALL.image_token_size, (1, grid * grid), generator=torch.Generator().manual_seed(4))
    shape = [1, SMALL.n_embed, grid, grid]
    with torch.no_grad():
        ref = hf.decode(codes)
        out = bf16.decode_code(codes, shape)
        theirs = hf.to(torch.bfloat16).decode(codes)
    assert out.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert close(ours.decode_code(codes, shape), ref, TOL[torch.float32])
    # bf16 rounding through ~40 random conv and norm layers: 3.1% from fp32 here, on both sides
    err, hf_err = rel_error(out, ref), rel_error(theirs, ref)
    assert err < 0.04 and rel_error(out, theirs) < 0.04 and err <= 1.25 * hf_err, (err, hf_err)
    pixels = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        h = bf16.encoder(pixels.to(torch.bfloat16))
        assert h.dtype == torch.bfloat16
        assert rel_error(h, ours.encoder(pixels)) < 0.025  # 1.6% here, 1.6% for transformers' bf16
    agree = (bf16.encode(pixels) == ours.encode(pixels)).float().mean()
    assert agree > 0.9  # only near-ties flip in bf16: 62 of the 64 codes agree here


def test_pixels_to_pil_matches_deepseek_conversion() -> None:
    # (x + 1) / 2 * 255, clipped, then truncated: 0 -> 127.5 -> 127 (rounding would give 128).
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0, -0.5, 0.5])
    expected = [0, 0, 127, 254, 255, 255, 63, 191]
    x = torch.zeros(2, 3, 4, 8)
    x[0, 0, 1] = values  # red channel, row 1 of the first image
    x[0, 1] = 1.0  # green everywhere in the first image
    x[1, 2, :, 3] = -1.0
    x[1, 2, :, 4] = 1.0
    a, b = pixels_to_pil(x.to(torch.bfloat16))  # bf16 holds every value above except 0.999
    assert a.mode == "RGB" and a.size == (8, 4)  # PIL size is (width, height)
    assert [a.getpixel((c, 1))[0] for c in range(8)] == [0, 0, 127, 255, 255, 255, 63, 191]
    assert a.getpixel((0, 0)) == (127, 255, 127) and b.getpixel((3, 2)) == (127, 127, 0)
    assert b.getpixel((4, 0)) == (127, 127, 255)
    x32 = torch.zeros(1, 3, 1, 8)
    x32[0, 0, 0] = values
    assert [pixels_to_pil(x32)[0].getpixel((c, 0))[0] for c in range(8)] == expected
