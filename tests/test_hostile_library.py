"""Hostile input through the library: every bad argument or text becomes a `janusvl.errors`
exception naming what is wrong, before any costly work (issue 13's "found by trying it" list;
images are in test_hostile_images.py)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janusvl import validation
from janusvl.engine import Engine
from janusvl.errors import InputError
from janusvl.generation import image as image_generation
from janusvl.generation.image import generate_images, multinomial_sampler
from janusvl.generation.sampling import SamplingParams
from janusvl.processing.processor import load_pil_images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def within(seconds: float, call) -> object:
    """`call()`'s result or exception, failing the test if it takes longer (a hang)."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


# --- arguments ------------------------------------------------------------------------------------

BAD_CHAT_ARGS = [
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": 1e-9}, "temperature must be 0 (greedy) or at least 1e-05"),
    ({"max_new_tokens": None}, "max_new_tokens must be an integer, got None"),
    ({"max_new_tokens": 2.9}, "max_new_tokens must be an integer, got 2.9"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, got True"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be an integer, got '5'"),
    ({"top_k": 2.7}, "top_k must be an integer, got 2.7"),
    ({"top_k": -1}, "top_k must be >= 0, got -1"),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
    ({"top_p": float("inf")}, "top_p must be a finite number"),
    ({"stop": 42}, "stop must be a string or a list of non-empty strings, got 42"),
    ({"stop": ["ok", ""]}, "stop must be a string or a list of non-empty strings; stop[1] is ''"),
    ({"stop": ["\ud800"]}, "stop[0] holds a lone surrogate"),
    ({"seed": 2**70}, f"seed must be at most {2**63 - 1}, got {2**70}"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CHAT_ARGS, ids=[m for _, m in BAD_CHAT_ARGS])
def test_chat_arguments_are_checked_and_named(janus, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError) as err:
        janus.chat("Hi", **kwargs)
    assert str(err.value).startswith(message)
    with pytest.raises(InputError) as err:
        janus.chat_batch(["Hi", "Ho"], **kwargs)
    assert str(err.value).startswith(message)
    if kwargs != {"max_new_tokens": None}:  # the engine takes None: what the context leaves
        with pytest.raises(InputError) as err:
            Engine(janus).chat_request("Hi", **kwargs)
        assert str(err.value).startswith(message)


def test_other_chat_entry_points_check_their_arguments(janus, tiny) -> None:
    with pytest.raises(InputError, match="^batch_size must be >= 1, got 0"):
        janus.caption_batch([Image.new("RGB", (8, 8))], batch_size=0)
    with pytest.raises(InputError, match="^top_k must be an integer, got 2.7"):
        janus.caption_batch([Image.new("RGB", (8, 8))], top_k=2.7)
    with pytest.raises(InputError, match="^color: caption_batch takes"):
        janus.caption_batch([Image.new("RGB", (8, 8))], color="red")
    with pytest.raises(InputError, match="^n must be an integer, got True"):
        Engine(janus).chat_request("Hi", n=True)
    with pytest.raises(InputError, match="^max_batch must be an integer, got True"):
        Engine(janus, max_batch=True)
    with pytest.raises(InputError, match="^top_k must be an integer, got 2.7"):
        SamplingParams(temperature=1.0, top_k=2.7)
    _, processor, model = tiny
    batch = processor(prompt="Hi")
    embeds = model.prepare_inputs_embeds(**batch)
    with pytest.raises(InputError, match="^max_new_tokens must be an integer, got 2.9"):
        model.language_model.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, max_new_tokens=2.9)
    with pytest.raises(InputError, match="^seed must be at most"):
        model.language_model.generate(inputs_embeds=embeds, max_new_tokens=2, do_sample=True, seed=2**64)


def test_valid_numbers_of_other_types_are_taken_as_they_are(janus) -> None:
    """numpy integers and plain ints where floats are expected are fine: only the value counts."""
    a = janus.chat("Hi", max_new_tokens=np.int64(3), temperature=1, top_k=np.int32(5), seed=np.uint8(7))
    b = janus.chat("Hi", max_new_tokens=3, temperature=1.0, top_k=5, seed=7)
    assert a == b


@pytest.mark.parametrize(("where", "call"), [
    ("messages[0].content", lambda j: j.chat("caf\ud800")),
    ("messages[0].content[0].text", lambda j: j.chat([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}])),
    ("prompt", lambda j: j.processor(prompt="a\ud83d")),
    ("the text to encode", lambda j: j.tokenizer.encode("\ud800")),
    ("conversations[0]['content']", lambda j: j.processor.apply_sft_template_for_multi_turn_prompts(
        [{"role": "<|User|>", "content": "\ud800"}])),
    ("prompt", lambda j: j.generate_images("a \udc80 cat")),
])
def test_lone_surrogates_are_refused_naming_where(janus, where: str, call) -> None:
    with pytest.raises(InputError) as err:
        call(janus)
    assert str(err.value).startswith(f"{where} holds a lone surrogate")


def test_deepseek_images_as_a_string_are_refused(janus, tmp_path: Path) -> None:
    message = {"role": "<|User|>", "content": "<image_placeholder>\nWhat is it?", "images": "x.png"}
    with pytest.raises(InputError, match=r"^messages\[0\]\.images must be a list of images, got a single str.*\['x\.png'\]"):
        janus.chat([message, {"role": "<|Assistant|>", "content": ""}])
    with pytest.raises(InputError, match=r"^conversations\[0\]\['images'\] must be a list of images"):
        load_pil_images([message])


# --- image generation -----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 65}, "n must be at most 64, got 65"),
    ({"n": 10000}, "n must be at most 64, got 10000"),
    ({"cfg_weight": 1e30}, "cfg_weight must be in (0, 100], got 1e+30"),
    ({"cfg_weight": float("nan")}, "cfg_weight must be a finite number"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": 0}, "temperature must be at least 1e-05, got 0"),
    ({"seed": 2**64}, "seed must be at most"),
])
def test_image_generation_bounds(janus, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError) as err:
        within(10, lambda: janus.generate_images("a red cube", **kwargs))
    assert str(err.value).startswith(message)
    with pytest.raises(InputError) as err:
        Engine(janus).image_request("a red cube", **kwargs)
    assert str(err.value).startswith(message)


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


def test_the_advice_names_what_fits() -> None:
    with pytest.raises(InputError, match=r"lower max_new_tokens to at most 1$"):
        validation.check_length(99, 5, 100)
    with pytest.raises(InputError, match=r"the prompt alone needs 100 tokens and the context holds 100; "
                                         r"shorten the text by 5 tokens$"):
        validation.check_length(100, 5, 100)
    with pytest.raises(InputError, match=r"remove images \(578 tokens each\) and shorten the text, 905 tokens in all$"):
        validation.check_length(1000, 5, 100, images=1, tokens_per_image=578)


def test_ids_and_samples_handed_back_in_are_checked(janus, tiny) -> None:
    tokenizer, processor, model = tiny
    for ids, message in (([-1], r"^ids\[0\] must be >= 0, got -1"), ([5, 2**40], r"^ids\[1\] must be at most"),
                         ([1.5], r"^ids\[0\] must be an integer, got 1.5"), (None, "^decode takes a sequence")):
        with pytest.raises(InputError, match=message):
            tokenizer.decode(ids)
    with pytest.raises(InputError, match=r"^outputs\[0\] is a dict, not a process_one output"):
        processor.batchify([{"input_ids": [1]}])
    from janusvl.generation.image import decode_image_tokens

    with pytest.raises(InputError, match=r"^tokens must be code ids in 0\.\.16383"):
        decode_image_tokens(model, torch.full((1, 576), 16384))
    with pytest.raises(InputError, match="^tokens must be integer code ids, got torch.float32"):
        decode_image_tokens(model, torch.zeros(1, 576))
    batch = processor(prompt="Hi")
    embeds = model.prepare_inputs_embeds(**batch)
    with pytest.raises(InputError, match=r"^eos_token_id\[1\] must be an integer, got 'x'"):
        model.language_model.generate(inputs_embeds=embeds, max_new_tokens=1, eos_token_id=[1, "x"])
    with pytest.raises(InputError, match="^pad_token_id must be an integer"):
        model.language_model.generate(inputs_embeds=embeds, max_new_tokens=1, pad_token_id=2.5)


def test_batch_settings_are_checked() -> None:
    from janusvl.batch.jobs import Backend

    with pytest.raises(InputError, match="^replicas must be an integer, got True"):
        Backend("ray", replicas=True)
    with pytest.raises(InputError, match="^cpus_per_replica must be a number, got '2'"):
        Backend("ray", cpus_per_replica="2")


def test_a_vanishing_top_p_keeps_the_likeliest_token() -> None:
    """Found by the property tests: top_p 5e-285 is 0 in float32, which dropped every token."""
    from janusvl.generation.sampling import sample

    logits = torch.tensor([[0.0], [2.0]]).reshape(1, 2)
    params = SamplingParams(temperature=1.0, top_p=5e-285)
    assert sample(logits, params, torch.Generator().manual_seed(0)).tolist() == [1]
