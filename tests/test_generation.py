"""Text generation: greedy parity with transformers' Janus `generate`, KV-cached decoding equal to
a full forward, DeepSeek's `language_model.generate` contract (left padding, per-row EOS, padding
after it, the context limit), the sampling filters, and the streaming detokenizer."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from conftest import EOS_PROMPT, EOS_STEP, make_image
from janusvl import InputError
from janusvl.generation.sampling import SamplingParams, filter_logits
from janusvl.generation.stream import IncrementalDetokenizer, StopMatcher, TextStream
from janusvl.generation.text import decode_step, generate_tokens, prefill
from janusvl.processing import JanusTokenizer
from janusvl.testing.tokenizer import write_tokenizer

USER, ASSISTANT = "<|User|>", "<|Assistant|>"


def conversation(text: str, images: list | None = None) -> list[dict]:
    return [{"role": USER, "content": text, "images": images or []}, {"role": ASSISTANT, "content": ""}]


CONVERSATIONS = {
    "text": conversation("Tell me a story about a café in 日本."),
    "short_text": conversation("What is this?"),
    "two_images": conversation("Compare <image_placeholder> and <image_placeholder> please.",
                               [make_image(320, 240, seed=6), make_image(128, 256, seed=7)]),
}


def inputs(tiny, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused embeddings [B, T, D] and attention mask [B, T] of a left-padded batch."""
    _, processor, model = tiny
    outs = [processor.process_one(conversations=CONVERSATIONS[n], images=CONVERSATIONS[n][0]["images"])
            for n in names]
    batch = processor.batchify(outs)
    with torch.no_grad():
        return model.prepare_inputs_embeds(**batch), batch.attention_mask


def deepseek_generate_kwargs(tokenizer) -> dict:
    return dict(pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, max_new_tokens=32, min_new_tokens=32,
                do_sample=False, use_cache=True)


@pytest.mark.parametrize("names", [["text"], ["two_images"], ["text", "two_images", "short_text"]],
                         ids=["single", "multi_image", "left_padded_batch"])
def test_greedy_generate_matches_transformers(tiny, hf_model, names: list[str]) -> None:
    tokenizer, _, model = tiny
    embeds, mask = inputs(tiny, names)
    kwargs = deepseek_generate_kwargs(tokenizer)
    ours = model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    theirs = hf_model.generate(inputs_embeds=embeds, attention_mask=mask, generation_mode="text", **kwargs)
    assert ours.shape == theirs.shape == (len(names), 32)  # given embeddings, both return new ids only
    assert torch.equal(ours, theirs)
    if "text" in names:  # the comparison is not between two constant sequences
        assert len(set(ours[names.index("text")].tolist())) > 10


def test_cached_decoding_matches_full_forward(tiny) -> None:
    """Every step's logits from prefill + cached decode equal a full forward over the prompt and
    all tokens so far, on a left-padded batch; and generate_tokens picks exactly those tokens."""
    _, _, model = tiny
    lm = model.language_model
    embeds, mask = inputs(tiny, ["text", "short_text"])
    B, T, _ = embeds.shape
    steps = 12
    greedy = [ids.clone() for ids, _ in generate_tokens(lm, embeds, mask, steps, eos_token_id=None)]
    cache = lm.model.new_cache(B, T + steps)
    seq, seq_mask = embeds, mask
    with torch.no_grad():
        logits = prefill(lm, embeds, mask, cache)
        position = mask.sum(-1, keepdim=True)
        for step in range(steps):
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            full = lm(inputs_embeds=seq, attention_mask=seq_mask, position_ids=positions).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=0, atol=2e-5)
            ids = logits.argmax(-1)
            assert torch.equal(ids, greedy[step]), step
            seq = torch.cat([seq, lm.get_input_embeddings()(ids)[:, None]], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones(B, 1, dtype=seq_mask.dtype)], dim=1)
            logits = decode_step(lm, ids, position, cache)
            position = position + 1
    assert cache.length == T + steps


def test_each_row_stops_at_its_eos_and_is_padded_after(tiny, eos_model) -> None:
    tokenizer, processor, _ = tiny
    model, base = eos_model
    eos, pad = tokenizer.eos_token_id, processor.pad_id
    batch = processor.batchify([processor.process_one(conversations=conversation(EOS_PROMPT)),
                                processor.process_one(conversations=conversation("What is this?"))])
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**batch)
    out = model.language_model.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                        pad_token_id=pad, eos_token_id=eos, max_new_tokens=20)
    rows = out.tolist()
    assert rows[0] == base[:EOS_STEP] + [eos] + [pad] * (out.shape[1] - EOS_STEP - 1)
    first_eos = rows[1].index(eos)  # the other row ends on its own, with padding behind
    assert rows[1][first_eos + 1:] == [pad] * (out.shape[1] - first_eos - 1)
    # the loop ends when the last row is finished, not at max_new_tokens
    assert out.shape[1] == max(EOS_STEP, first_eos) + 1 < 20


def test_min_new_tokens_holds_eos_back(tiny, eos_model) -> None:
    tokenizer, processor, _ = tiny
    model, _ = eos_model
    batch = processor(conversations=conversation(EOS_PROMPT))
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**batch)
    out = model.language_model.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                        eos_token_id=tokenizer.eos_token_id, max_new_tokens=10,
                                        min_new_tokens=10)
    assert out.shape == (1, 10) and tokenizer.eos_token_id not in out[0].tolist()


def test_max_new_tokens_beyond_the_context_is_an_input_error(tiny) -> None:
    _, _, model = tiny
    embeds, mask = inputs(tiny, ["short_text"])
    limit = model.config.language_config.max_position_embeddings
    room = limit - embeds.shape[1]
    with pytest.raises(InputError, match=rf"exceeds the model's context of {limit}.*at most {room}"):
        model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=limit)
    with pytest.raises(InputError, match="max_new_tokens must be >= 1"):
        generate_tokens(model.language_model, embeds, mask, 0, None)  # fails at the call, not at next()


# --- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 50, 1.0), (1.3, 0, 0.9),
                                                    (0.8, 20, 0.5), (1.0, 1, 1.0)])
def test_filters_match_transformers_warpers(temperature: float, top_k: int, top_p: float) -> None:
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(0)) * 3
    ours = filter_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    kept = torch.isfinite(ours).sum(-1)
    assert (kept < 500).all() or (top_k == 0 and top_p == 1)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.75)))
    assert kept.tolist() == [[True, True, False, False]]


def test_sampling_is_reproducible_under_a_seed(tiny) -> None:
    _, _, model = tiny
    embeds, mask = inputs(tiny, ["text", "short_text"])
    params = SamplingParams(temperature=1.0)

    def run(seed: int) -> list[list[int]]:
        steps = generate_tokens(model.language_model, embeds, mask, 16, None, params, seed=seed)
        return [ids.tolist() for ids, _ in steps]

    assert run(7) == run(7)
    assert run(7) != run(8)
    greedy = [ids.tolist() for ids, _ in generate_tokens(model.language_model, embeds, mask, 16, None)]
    assert run(7) != greedy  # temperature 1 on a random model does not collapse to the argmax


# --- streaming detokenizer -------------------------------------------------------------------------

MULTIBYTE = "Grüße aus 東京 😀🎉 → ≤ ❤️ crème brûlée 汉字"


def stream_all(tokenizer: JanusTokenizer, ids: list[int], stop: list[str] | None = None) -> list[str]:
    text = TextStream(tokenizer, stop or [])
    return [text.push(i) for i in ids] + [text.finish()]


def test_multibyte_characters_are_never_split(tiny) -> None:
    tokenizer = tiny[0]
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    # the case under test: several characters arrive as bytes spread over more than one token
    assert sum("\ufffd" in tokenizer.decode([i]) for i in ids) >= 4
    chunks = stream_all(tokenizer, ids)
    assert "".join(chunks) == MULTIBYTE
    assert not any("\ufffd" in c for c in chunks)
    assert "😀" in chunks or any(c.endswith("😀") for c in chunks)  # released whole, once complete
    assert len([c for c in chunks if c]) > 10


@pytest.fixture(scope="module")
def cleanup_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> JanusTokenizer:
    """The tiny tokenizer with clean_up_tokenization_spaces on (no Janus release sets it)."""
    path = tmp_path_factory.mktemp("cleanup")
    write_tokenizer(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    return JanusTokenizer.from_pretrained(path)


def test_stream_equals_decode_on_random_ids(tiny, cleanup_tokenizer) -> None:
    """Any id sequence (specials, stray bytes, invalid UTF-8 included) streams to decode's text."""
    rng = random.Random(0)
    for tokenizer in (tiny[0], cleanup_tokenizer):
        byte_ids = tokenizer.encode(MULTIBYTE + " I 'm here , ok ?\n", add_special_tokens=False)
        for _ in range(150):
            ids = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(len(tokenizer))
                   for _ in range(rng.randrange(1, 40))]
            assert "".join(stream_all(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_cleanup_spaces_stream_equals_decode(cleanup_tokenizer) -> None:
    text = "Hello , world . I 'm here !\nIt ' s ok ?\nDone ."
    ids = cleanup_tokenizer.encode(text, add_special_tokens=False)
    want = cleanup_tokenizer.decode(ids)
    assert want == "Hello, world. I'm here!\nIt's ok?\nDone."
    assert "".join(stream_all(cleanup_tokenizer, ids)) == want


def test_special_tokens_are_skipped(tiny) -> None:
    tokenizer = tiny[0]
    ids = [tokenizer.bos_token_id, *tokenizer.encode("Hi there", add_special_tokens=False),
           tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "Hi there"


def test_stop_matcher_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    stops = StopMatcher(["lo w", "xyz"])
    assert [stops.push("Hel"), stops.push("lo wo"), stops.push("rld")] == ["He", "l", ""]
    assert stops.stopped and stops.flush() == ""
    stops = StopMatcher(["abc"])
    assert [stops.push("xab"), stops.push("d"), stops.flush()] == ["x", "abd", ""]
    assert not stops.stopped


def test_stop_string_spanning_tokens(tiny) -> None:
    tokenizer = tiny[0]
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    stream = TextStream(tokenizer, ["東京 😀", "never"])
    chunks = [stream.push(i) for i in ids]
    assert stream.stopped and stream.text == "Grüße aus " and "".join(chunks) == "Grüße aus "
    assert stream.finish() == "" and stream.push(ids[0]) == ""
