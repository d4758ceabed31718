"""Text-to-image generation (issue 4): CFG decoding against transformers' Janus modules and against
DeepSeek's own generation_inference.py loop, VQ decoding, seeds, argument checks and the CLI."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janusvl.api import Janus
from janusvl.cli import imagine, main
from janusvl.errors import InputError
from janusvl.generation.image import (cfg_input_ids, decode_image_tokens, generate_image_tokens,
                                      generate_images, image_prompt)
from janusvl.models.vq import pixels_to_pil
from janusvl.processing import VLChatProcessor
from janusvl.testing.tokenizer import write_processor_configs, write_tokenizer

PROMPT = "a red cube on a wooden table"
SEED = 7
GRID, STEPS = 24, 576  # 384 / 16 for the tiny checkpoint, as for the released ones


@pytest.fixture(scope="module")
def fast(tiny) -> tuple[torch.Tensor, list[Image.Image]]:
    """Our fast path, n=2 with SEED: the codes and the images."""
    _, processor, model = tiny
    tokens = generate_image_tokens(model, processor, PROMPT, n=2, seed=SEED)
    return tokens, decode_image_tokens(model, tokens)


# --- prompt and CFG rows ------------------------------------------------------------------------

def test_prompt_and_cfg_rows(tiny, tmp_path: Path) -> None:
    _, processor, _ = tiny
    text = image_prompt(processor, f"  {PROMPT} ")
    assert text == f"<|User|>: {PROMPT}\n\n<|Assistant|>:<begin_of_image>"
    ids = processor.tokenizer.encode(text)
    rows = cfg_input_ids(ids, 2, processor.pad_id)
    T = len(ids)
    assert rows.shape == (4, T) and rows.dtype == torch.long
    assert rows[0].tolist() == rows[2].tolist() == ids
    bos, boi = processor.tokenizer.bos_token_id, processor.image_start_id
    assert rows[1].tolist() == rows[3].tolist() == [bos] + [processor.pad_id] * (T - 2) + [boi]
    # Janus-1.3B's tokenizer has no <|User|> token: its roles are plain words.
    write_tokenizer(tmp_path, roles="1.3b")
    write_processor_configs(tmp_path)
    old = VLChatProcessor.from_pretrained(tmp_path)
    assert image_prompt(old, PROMPT) == f"User: {PROMPT}\n\nAssistant:<begin_of_image>"
    assert image_prompt(old, PROMPT, roles=("Q", "A")) == f"Q: {PROMPT}\n\nA:<begin_of_image>"


# --- parity with transformers ---------------------------------------------------------------------

def test_vq_decoding_matches_transformers(tiny, hf_model) -> None:
    _, _, model = tiny
    codes = torch.randint(0, 16384, (3, GRID * GRID), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf_model.model.vqmodel.decode(codes)  # [3, 3, 384, 384]
        # DeepSeek's script passes int32 codes.
        ours = model.gen_vision_model.decode_code(codes.int(), shape=[3, 8, GRID, GRID])
    assert ours.shape == ref.shape == (3, 3, 384, 384) and ref.std() > 0.1
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    # Chunked decoding (2 + 1) gives the images of the batched decode, as PIL RGB.
    images = decode_image_tokens(model, codes, chunk=2)
    assert [(im.mode, im.size) for im in images] == [("RGB", (384, 384))] * 3
    for got, want in zip(images, pixels_to_pil(ours)):
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1


def hf_guided_logits(hf, ids: list[int], pad_id: int, forced: torch.Tensor, cfg_weight: float) -> torch.Tensor:
    """transformers' Janus modules driven step by step over our row layout with the forced codes:
    guided logits [steps, n, V]."""
    n, steps = forced.shape
    uncond = [ids[0]] + [pad_id] * (len(ids) - 2) + [ids[-1]]
    rows = torch.tensor([ids, uncond] * n)
    x = hf.model.get_input_embeddings()(rows)
    past, out = None, []
    with torch.no_grad():
        for step in range(steps):
            o = hf.model.language_model(inputs_embeds=x, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = hf.model.generation_head(o.last_hidden_state[:, -1])
            c, u = logits[0::2], logits[1::2]
            out.append(u + cfg_weight * (c - u))
            pair = forced[:, step].repeat_interleave(2)
            x = hf.model.generation_aligner(hf.model.generation_embeddings(pair))[:, None]
    return torch.stack(out)


def test_teacher_forced_guidance_matches_transformers(tiny, hf_model, capfd) -> None:
    _, processor, model = tiny
    forced = torch.randint(0, 16384, (2, STEPS), generator=torch.Generator().manual_seed(5))
    seen: list[torch.Tensor] = []

    def replay(guided: torch.Tensor) -> torch.Tensor:
        seen.append(guided.clone())
        return forced[:, len(seen) - 1]

    tokens = generate_image_tokens(model, processor, PROMPT, n=2, cfg_weight=3.0, sampler=replay)
    assert torch.equal(tokens, forced) and len(seen) == STEPS
    assert capfd.readouterr().err == ""  # no progress bar unless asked
    ids = processor.tokenizer.encode(image_prompt(processor, PROMPT))
    want = hf_guided_logits(hf_model, ids, processor.pad_id, forced, 3.0)
    got = torch.stack(seen)  # [576, 2, V]
    assert got.dtype == torch.float32 and got.shape == want.shape == (STEPS, 2, 16384)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * scale)
    # The forced codes reach the model: the two pairs' logits differ after the first step.
    assert torch.equal(got[0, 0], got[0, 1]) and not torch.allclose(got[1, 0], got[1, 1])


# --- DeepSeek's own script ------------------------------------------------------------------------

@torch.inference_mode()
def deepseek_generate(mmgpt, vl_chat_processor, prompt: str, temperature: float = 1,
                      parallel_size: int = 2, cfg_weight: float = 5, image_token_num_per_image: int = 576,
                      img_size: int = 384, patch_size: int = 16, decode: bool = True,
                      ) -> tuple[torch.Tensor, np.ndarray | None]:
    """generation_inference.py's `generate` on CPU, returning the codes and (with decode) the
    uint8 images instead of saving them."""
    input_ids = torch.LongTensor(vl_chat_processor.tokenizer.encode(prompt))
    tokens = torch.zeros((parallel_size * 2, len(input_ids)), dtype=torch.int)
    for i in range(parallel_size * 2):
        tokens[i, :] = input_ids
        if i % 2 != 0:
            tokens[i, 1:-1] = vl_chat_processor.pad_id
    inputs_embeds = mmgpt.language_model.get_input_embeddings()(tokens)
    generated_tokens = torch.zeros((parallel_size, image_token_num_per_image), dtype=torch.int)
    for i in range(image_token_num_per_image):
        outputs = mmgpt.language_model.model(inputs_embeds=inputs_embeds, use_cache=True,
                                             past_key_values=outputs.past_key_values if i != 0 else None)
        hidden_states = outputs.last_hidden_state
        logits = mmgpt.gen_head(hidden_states[:, -1, :])
        logit_cond, logit_uncond = logits[0::2, :], logits[1::2, :]
        logits = logit_uncond + cfg_weight * (logit_cond - logit_uncond)
        probs = torch.softmax(logits / temperature, dim=-1)
        next_token = torch.multinomial(probs, num_samples=1)
        generated_tokens[:, i] = next_token.squeeze(dim=-1)
        next_token = torch.cat([next_token.unsqueeze(dim=1), next_token.unsqueeze(dim=1)], dim=1).view(-1)
        inputs_embeds = mmgpt.prepare_gen_img_embeds(next_token).unsqueeze(dim=1)
    if not decode:
        return generated_tokens, None
    dec = mmgpt.gen_vision_model.decode_code(generated_tokens.to(dtype=torch.int),
                                              shape=[parallel_size, 8, img_size // patch_size, img_size // patch_size])
    dec = dec.to(torch.float32).cpu().numpy().transpose(0, 2, 3, 1)
    dec = np.clip((dec + 1) / 2 * 255, 0, 255)
    visual_img = np.zeros((parallel_size, img_size, img_size, 3), dtype=np.uint8)
    visual_img[:, :, :] = dec
    return generated_tokens, visual_img


def deepseek_prompt(vl_chat_processor, text: str) -> str:
    conversation = [{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}]
    sft_format = vl_chat_processor.apply_sft_template_for_multi_turn_prompts(
        conversations=conversation, sft_format=vl_chat_processor.sft_format, system_prompt="")
    return sft_format + vl_chat_processor.image_start_tag


def test_deepseek_script_gives_the_fast_path_codes_and_images(tiny, fast) -> None:
    _, vl_chat_processor, vl_gpt = tiny
    # The script draws from torch's global RNG; a CPU generator seeded alike replays that stream,
    # so equal codes mean equal probabilities at every one of the 576 steps.
    torch.manual_seed(SEED)
    codes, visual_img = deepseek_generate(vl_gpt, vl_chat_processor, deepseek_prompt(vl_chat_processor, PROMPT))
    tokens, images = fast
    assert torch.equal(codes.long(), tokens)
    assert len(set(tokens[0].tolist())) > 100  # real sampling, not a collapsed distribution
    assert [(im.mode, im.size) for im in images] == [("RGB", (384, 384))] * 2
    for i, image in enumerate(images):
        assert np.array_equal(np.asarray(image), visual_img[i])


def test_deepseek_script_with_other_guidance_and_temperature(tiny, fast) -> None:
    _, processor, model = tiny
    torch.manual_seed(SEED)
    codes, _ = deepseek_generate(model, processor, deepseek_prompt(processor, PROMPT), temperature=0.5,
                                 parallel_size=3, cfg_weight=2.0, decode=False)
    ours = generate_image_tokens(model, processor, PROMPT, n=3, cfg_weight=2.0, temperature=0.5, seed=SEED)
    assert torch.equal(codes.long(), ours)
    assert (ours[:2] != fast[0]).float().mean() > 0.9  # the arguments changed the draws


# --- seeds ----------------------------------------------------------------------------------------

def test_seed_reproduces_and_varies(tiny, fast) -> None:
    _, processor, model = tiny
    tokens, images = fast
    again = Janus(model, processor).generate_images(PROMPT, n=2, seed=SEED)  # the high-level API
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]
    assert images[0].tobytes() != images[1].tobytes()  # the two samples of one call differ
    other = generate_image_tokens(model, processor, PROMPT, n=2, seed=SEED + 1)
    assert (other != tokens).float().mean() > 0.9
    other_image = decode_image_tokens(model, other[:1])[0]
    assert other_image.tobytes() != images[0].tobytes()


# --- argument checks ------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "name"), [
    ({"prompt": ""}, "prompt"), ({"prompt": "  \n"}, "prompt"), ({"prompt": None}, "prompt"),
    ({"n": 0}, "n"), ({"n": 2.0}, "n"), ({"n": True}, "n"),
    ({"cfg_weight": 0}, "cfg_weight"), ({"cfg_weight": -1.0}, "cfg_weight"),
    ({"cfg_weight": float("inf")}, "cfg_weight"), ({"cfg_weight": "5"}, "cfg_weight"),
    ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"seed": 1.5}, "seed"), ({"roles": ("<|User|>",)}, "roles"),
])
def test_bad_arguments_name_the_parameter(tiny, kwargs: dict, name: str) -> None:
    _, processor, model = tiny
    args = {"prompt": PROMPT, **kwargs}
    with pytest.raises(InputError, match=rf"^{name} "):
        generate_images(model, processor, **args)


def test_decode_rejects_wrong_token_shape(tiny) -> None:
    _, _, model = tiny
    with pytest.raises(InputError, match=r"\[n, 576\]"):
        decode_image_tokens(model, torch.zeros(1, 100, dtype=torch.long))


# --- CLI ------------------------------------------------------------------------------------------

def janusvl(*args: str) -> subprocess.CompletedProcess:
    """`python -m janusvl ...`: the command line's main(), in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "janusvl", *args], capture_output=True, text=True, timeout=300)


def test_cli_imagine_writes_the_seeded_images(tiny_dir: Path, fast, tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    r = janusvl("imagine", str(tiny_dir), PROMPT, "-n", "2", "-o", str(out), "--seed", str(SEED),
                "--device", "cpu", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["image-000.png", "image-001.png"]
    assert r.stdout.split() == [str(f) for f in files]
    assert "576/576" in r.stderr  # the progress bar ran over all steps, on stderr
    for file, want in zip(files, fast[1]):
        with Image.open(file) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (384, 384))
            assert im.tobytes() == want.tobytes()  # same seed and defaults as the library call


# Each case: argv after `janusvl imagine`, given the good model dir, a good output dir and tmp_path.
ERROR_CASES = {
    "n=0": (lambda m, o, t: [m, PROMPT, "-o", o, "-n", "0"], 2, "-n/--num-images: expected an integer >= 1"),
    "negative cfg": (lambda m, o, t: [m, PROMPT, "-o", o, "--cfg-weight", "-1"], 2,
                     "--cfg-weight: expected a positive number"),
    "bad dtype": (lambda m, o, t: [m, PROMPT, "-o", o, "--dtype", "int8"], 2, "--dtype: invalid choice"),
    "extra args": (lambda m, o, t: [PROMPT, "extra", "words"], 2, "unrecognized arguments"),
    "blank prompt": (lambda m, o, t: [m, "  ", "-o", o], 1, "imagine: error: prompt must be a non-empty string"),
    "bad device": (lambda m, o, t: [m, PROMPT, "-o", o, "--device", "tpu9"], 1, "'tpu9': not a device name"),
    "bad model": (lambda m, o, t: [str(t / "nowhere"), PROMPT, "-o", o], 1, "no such checkpoint directory"),
    # Under a regular file, so even root cannot create it. The model path is bad too and the
    # output error wins: the directory is checked before anything loads.
    "bad output": (lambda m, o, t: [str(t / "nowhere"), PROMPT, "-o", str(t / "file" / "sub")], 1,
                   "cannot write to output directory"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_cli_imagine_errors(tiny_dir: Path, tmp_path: Path, capsys, case: str) -> None:
    argv, code, message = ERROR_CASES[case]
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    try:  # in process: the same main() as the entry point, without an interpreter start per case
        status = main(["imagine", *argv(str(tiny_dir), str(out), tmp_path)])
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    assert status == code
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_cli_numbering_never_overwrites(tmp_path: Path) -> None:
    for name in ("image-000.png", "image-007.png", "notes.txt", "image-x.png"):
        (tmp_path / name).write_bytes(name.encode())
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    paths = imagine.save_numbered([red, blue], tmp_path)
    assert [p.name for p in paths] == ["image-008.png", "image-009.png"]
    assert (tmp_path / "image-007.png").read_bytes() == b"image-007.png"
    with Image.open(paths[1]) as im:
        assert im.getpixel((0, 0)) == (0, 0, 255)
    parser = argparse.ArgumentParser()
    imagine.add_parser(parser.add_subparsers())
    args = parser.parse_args(["imagine", "m", "p"])
    assert (args.num_images, args.output_dir, args.cfg_weight, args.temperature, args.seed) == (1, Path("."), 5.0, 1.0, None)
    assert args.run is imagine.run
