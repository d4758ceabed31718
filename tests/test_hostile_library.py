"""Hostile input through the library: every bad argument or text becomes a `janusvl.errors`
exception naming what is wrong, before any costly work (issue 13's "found by trying it" list).
Inputs and their errors are rows of tests/hostile_cases.py (run by test_hostile_corpus.py); the
tests here check what a row cannot: that no costly work happens before the error, and the
sampler's guards. Images are in test_hostile_images.py."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from hostile_report import within
from janusvl import validation
from janusvl.engine import Engine
from janusvl.errors import InputError
from janusvl.generation import image as image_generation
from janusvl.generation.image import generate_images, multinomial_sampler
from janusvl.generation.sampling import SamplingParams

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


# --- image generation -----------------------------------------------------------------------------

def test_image_memory_is_checked_before_allocating(tiny, monkeypatch) -> None:
    _, processor, model = tiny
    need = image_generation.image_memory(model, 64, 20)
    cfg = model.config.language_config
    kv = 2 * cfg.num_hidden_layers * 128 * cfg.num_key_value_heads * (20 + 576) * cfg.head_dim * 4  # fp32 rows
    assert need == kv + 128 * 20 * 2 * cfg.intermediate_size * 4
    monkeypatch.setattr(validation, "available_memory", lambda device: 2**20)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(InputError, match=r"^n: generating 3 image\(s\) needs about .* GiB, but only 0.0 GiB is free"):
        generate_images(model, processor, "a red cube", n=3)


def test_a_tiny_temperature_draws_the_argmax_even_in_half_precision() -> None:
    logits = torch.tensor([[1.0, 9.0, 3.0], [50.0, -2.0, 49.0]], dtype=torch.float16)
    draw = multinomial_sampler(1e-5, torch.Generator().manual_seed(0))
    assert draw(logits).tolist() == [1, 0]  # logits / 1e-5 overflow float16; no NaN reaches softmax


def test_the_overflow_guard_changes_no_draw() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ours = multinomial_sampler(0.7, torch.Generator().manual_seed(5))(logits)
    plain = torch.multinomial(torch.softmax(logits / 0.7, dim=-1), 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, plain.squeeze(-1))


# --- order of checks --------------------------------------------------------------------------------

def many_images_message(count: int) -> list[dict]:
    image = png_bytes(Image.new("RGB", (16, 16), "blue"))
    parts = [{"type": "image", "image": image} for _ in range(count)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What are these?"}]}]


def test_tokens_are_counted_before_any_image_is_opened(janus, monkeypatch) -> None:
    from janusvl.processing import processor as processor_module

    opened = []
    monkeypatch.setattr(processor_module, "open_image", lambda *a: opened.append(a) or pytest.fail("opened"))
    messages = many_images_message(50)
    prompt = janus.prompt(messages)
    context = janus.model.config.language_config.max_position_embeddings
    excess = len(prompt.ids) + 16 - context
    remove = -(-excess // janus.processor.tokens_per_image)
    want = (f"the prompt alone needs {len(prompt.ids)} tokens with 50 image(s) and the context holds {context}; "
            f"remove {remove} image(s) or shorten the text by {excess} tokens")
    with pytest.raises(InputError) as err:
        within(10, lambda: janus.chat(messages, max_new_tokens=16))
    assert want in str(err.value) and "at most 0" not in str(err.value)
    with pytest.raises(InputError) as err:
        Engine(janus).chat_request(messages)  # max_new_tokens None: what the context leaves
    assert "remove" in str(err.value) and "image(s)" in str(err.value)
    assert opened == []
    # The rows of a batch are all checked before any of them opens an image.
    with pytest.raises(InputError, match="remove"):
        janus.chat_batch([many_images_message(1), messages], max_new_tokens=16)
    assert opened == []


def test_a_vanishing_top_p_keeps_the_likeliest_token() -> None:
    """Found by the property tests: top_p 5e-285 is 0 in float32, which dropped every token."""
    from janusvl.generation.sampling import sample

    logits = torch.tensor([[0.0], [2.0]]).reshape(1, 2)
    params = SamplingParams(temperature=1.0, top_p=5e-285)
    assert sample(logits, params, torch.Generator().manual_seed(0)).tolist() == [1]
