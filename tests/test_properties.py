"""Property tests (suite 1 of issue 13): whatever a caller passes to message building, the chat
template, the processor, image opening, the argument checks or the sampler, the call either
works or raises a `janusvl.errors` type, never another exception and never a hang.

Examples are derandomized (the same ones every run) and each runs under a wall-clock limit; the
whole file takes well under two minutes on two cores."""

from __future__ import annotations

import io
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from janusvl import validation
from janusvl.errors import JanusError
from janusvl.generation.sampling import SamplingParams, sample
from janusvl.messages import PRO_ROLES, build_conversation
from janusvl.processing import apply_sft_template, open_image

LIMIT_S = 10  # a hang fails the example instead of stalling the suite
# Damaged TIFF and EXIF data make Pillow warn before it fails; the failure is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")


def checks(max_examples: int, seconds: float = 5.0):
    return settings(max_examples=max_examples, deadline=timedelta(seconds=seconds), derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)


@contextmanager
def time_limit(seconds: float = LIMIT_S) -> Iterator[None]:
    """Interrupt the main thread with TimeoutError (which no test accepts) after `seconds`."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def works_or_janus_error(call, *args, **kwargs) -> tuple[bool, object]:
    """(True, result) or (False, the JanusError); any other exception fails the example."""
    with time_limit():
        try:
            result = call(*args, **kwargs)
        except JanusError as exc:
            assert str(exc), "an error must say what is wrong"
            event(f"{getattr(call, '__name__', 'call')}: {type(exc).__name__}: {str(exc)[:50]}")
            return False, exc
    event(f"{getattr(call, '__name__', 'call')}: works")
    return True, result


# --- strategies -----------------------------------------------------------------------------------

SPECIAL = ["<image_placeholder>", "<|User|>", "<|Assistant|>", "<｜end▁of▁sentence｜>", "<begin_of_image>",
           "\ud800", "\udfff x", "", " ", "\n\n", "data:image/png;base64,", "data:image/png;base64,iVBORw0KGgo=",
           "HTTP://example.com/a.png", "file:///nonexistent.png", "/dev/zero", "/", "missing.png", "\x00"]
texts = st.text(st.characters(exclude_categories=()), max_size=24) | st.sampled_from(SPECIAL)
numbers = (st.integers(min_value=-(2**80), max_value=2**80) | st.floats(allow_nan=True, allow_infinity=True)
           | st.booleans() | st.none() | texts | st.just(np.int64(3)) | st.just(np.float32(0.5)))
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts | st.binary(max_size=16)
KEYS = ["role", "content", "images", "type", "text", "image", "image_url", "url"]
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS) | texts, inner, max_size=4), max_leaves=10)

ROLES = ["user", "assistant", "system", "developer", *PRO_ROLES, "User", "Assistant"]


def encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 200).save(buf, format=fmt)
    return buf.getvalue()


VALID_ENCODED = [encoded("PNG"), encoded("JPEG"), encoded("GIF", "P"), encoded("BMP"), encoded("PNG", "I;16"),
                 encoded("TIFF", "L"), encoded("WEBP"), encoded("PNG", "LA", (3, 9))]
GOOD_IMAGES = [VALID_ENCODED[0], Image.new("RGB", (5, 7), "blue"),
               "data:image/png;base64," + __import__("base64").b64encode(VALID_ENCODED[1]).decode()]


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A valid encoding, cut short or with a few bytes changed."""
    data = bytearray(draw(st.sampled_from(VALID_ENCODED)))
    if draw(st.booleans()):
        return bytes(data[:draw(st.integers(0, len(data)))])
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


image_sources = (st.sampled_from(GOOD_IMAGES) | st.sampled_from(GOOD_IMAGES)
                 | st.sampled_from([Image.new("L", (0, 0)), b"", "missing.png", "/dev/zero", "/"])
                 | damaged() | texts | st.integers())
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"type": st.just("image"), "image": image_sources}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": texts})}),
    json_values,
)
contents = st.none() | texts | st.lists(parts, max_size=3) | json_values
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES) | texts | st.integers()},
    optional={"content": contents, "images": st.lists(image_sources, max_size=2) | image_sources})
# Ordinary text, and the special tokens a user may type (the image tag aside: it must match images).
plain_texts = st.text(max_size=24) | st.text(max_size=24) | st.sampled_from(["", *SPECIAL[1:5]])


@st.composite
def chats(draw: st.DrawFn, max_images: int = 2) -> list[dict]:
    """Mostly well-formed conversations (alternating turns, a user turn last), with hostile text
    and images mixed in."""
    turns = 2 * draw(st.integers(0, 1)) + 1
    out = []
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        images = draw(st.lists(image_sources, max_size=max_images)) if role == "user" else []
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": draw(plain_texts)}]
        out.append({"role": role, "content": content if images else content[-1]["text"]})
    return out


conversations = chats() | chats() | st.lists(messages, max_size=4) | json_values | texts


# --- message building and the chat template -------------------------------------------------------

@checks(300)
@given(conversation=conversations, roles=st.sampled_from([PRO_ROLES, ("User", "Assistant")]) | json_values,
       tag=st.sampled_from(["<image_placeholder>"]) | texts)
def test_message_building(conversation, roles, tag) -> None:
    ok, conv = works_or_janus_error(build_conversation, conversation, roles, tag)
    if ok:  # user and assistant turns alternate, ending with the assistant's open turn
        assert len(conv.messages) % 2 == 0 and conv.messages[-1]["content"].strip() == ""
        assert all(isinstance(m["content"], str) and isinstance(m["role"], str) for m in conv.messages)


deepseek_turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": plain_texts}), max_size=4)


@checks(300)
@given(conversation=deepseek_turns | deepseek_turns | conversations,
       sft_format=st.just("deepseek") | st.just("deepseek") | json_values, system=st.none() | plain_texts | json_values)
def test_chat_template(conversation, sft_format, system) -> None:
    ok, prompt = works_or_janus_error(apply_sft_template, conversation, sft_format, system)
    if ok:
        assert isinstance(prompt, str) and prompt == prompt.strip()
        prompt.encode("utf-8")  # what reaches the tokenizer is valid text


# --- the processor and image opening ------------------------------------------------------------------

@st.composite
def prompts_with_images(draw: st.DrawFn) -> tuple[object, object]:
    """A prompt with 0-2 image tags and, mostly, as many images; sometimes anything at all."""
    tags = draw(st.integers(0, 2))
    pieces = [draw(plain_texts) for _ in range(tags + 1)]
    prompt = "<image_placeholder>\n".join(pieces)
    images = draw(st.lists(image_sources, min_size=tags, max_size=tags) | st.lists(image_sources, max_size=3)
                  | image_sources | st.none())
    return draw(st.just(prompt) | st.just(prompt) | json_values), images


@checks(100)
@given(case=prompts_with_images())
def test_processor(tiny, case) -> None:
    _, processor, _ = tiny
    prompt, images = case
    ok, batch = works_or_janus_error(processor, prompt=prompt, images=images)
    if ok:
        n = int(batch.images_emb_mask.any(-1).sum())
        assert int(batch.images_seq_mask.sum()) == n * processor.num_image_tokens
        assert batch.input_ids.shape == batch.attention_mask.shape


small_counts = st.integers(1, 3)


@checks(100, seconds=10)
@given(conversation=chats(max_images=1) | chats(max_images=1) | st.lists(messages, min_size=1, max_size=3),
       max_new_tokens=small_counts | small_counts | small_counts | numbers,
       temperature=st.sampled_from([0.0, 0.7]) | st.sampled_from([0.0, 0.7]) | numbers)
def test_chat(janus, conversation, max_new_tokens, temperature) -> None:
    ok, result = works_or_janus_error(janus.chat, conversation, max_new_tokens=max_new_tokens,
                                      temperature=temperature, seed=0)
    if ok:
        assert result.completion_tokens <= max_new_tokens and result.finish_reason in ("stop", "length")


PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@checks(200)
@given(data=st.sampled_from(VALID_ENCODED) | damaged() | damaged() | st.binary(max_size=200)
       | st.binary(max_size=200).map(lambda b: PNG_HEADER + b))
def test_opening_bytes(data: bytes) -> None:
    for source in (data, "data:image/png;base64," + __import__("base64").b64encode(data).decode()):
        ok, image = works_or_janus_error(open_image, source)
        if ok:
            assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


# --- argument checks and the sampler --------------------------------------------------------------------

@checks(400)
@given(value=st.integers(-3, 12) | st.floats(-1, 3) | numbers | json_values)
def test_argument_checks(value) -> None:
    ok, got = works_or_janus_error(validation.integer, "x", value, 0, 10)
    if ok:
        assert type(got) is int and 0 <= got <= 10
    ok, got = works_or_janus_error(validation.number, "x", value, 0.0, 2.0)
    if ok:
        assert type(got) is float and 0.0 <= got <= 2.0
    ok, got = works_or_janus_error(validation.seed, "seed", value)
    if ok:
        assert got is None or 0 <= got <= validation.MAX_SEED
        torch.Generator().manual_seed(got or 0)
    ok, got = works_or_janus_error(validation.stop_list, value)
    if ok:
        assert all(isinstance(s, str) and s for s in got)


logits_arrays = st.integers(1, 3).flatmap(lambda b: st.integers(1, 40).flatmap(
    lambda v: st.lists(st.floats(-1e4, 1e4, width=32), min_size=b * v, max_size=b * v).map(
        lambda xs: torch.tensor(xs, dtype=torch.float32).reshape(b, v))))


@checks(300)
@given(logits=logits_arrays, temperature=st.sampled_from([0.0, 1e-5, 0.7, 1.0, 50.0]) | numbers,
       top_p=st.sampled_from([1.0, 0.9, 1e-3, 1e-45, 5e-285]) | numbers, top_k=st.sampled_from([0, 1, 5]) | numbers)
def test_sampler(logits: torch.Tensor, temperature, top_p, top_k) -> None:
    ok, params = works_or_janus_error(SamplingParams, temperature=temperature, top_p=top_p, top_k=top_k)
    if not ok:
        return
    with time_limit():
        ids = sample(logits, params, torch.Generator().manual_seed(0))
    assert ids.shape == (logits.shape[0],) and bool(((ids >= 0) & (ids < logits.shape[1])).all())
    if params.greedy:
        assert torch.equal(ids, logits.argmax(-1))
    elif 0 < params.top_k < logits.shape[1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1]
        assert bool((logits.gather(1, ids[:, None]).squeeze(1) >= kth).all())


def test_time_limit_interrupts_a_hang() -> None:
    """The guard the properties rely on does stop a call that never returns."""
    import time

    with pytest.raises(TimeoutError):
        with time_limit(0.2):
            time.sleep(5)
