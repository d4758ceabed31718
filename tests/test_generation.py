"""Text generation: greedy and sampled parity with transformers' Janus `generate`, KV-cached
decoding equal to a full forward (selected rows, a growing cache, the end of the context),
DeepSeek's `language_model.generate` contract (left padding, per-row EOS or a list of them,
padding after it, `input_ids=`, the context limit), the sampling filters and the distributions
they leave, and the streaming detokenizer."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from conftest import EOS_PROMPT, EOS_STEP, make_image
from janusvl import InputError
from janusvl.generation.sampling import SamplingParams, filter_logits, sample
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


def test_deepseek_generate_samples_as_transformers_does(tiny, hf_model) -> None:
    """do_sample=True draws what transformers' generate draws from the same global seed, with its
    default top_k of 50 in force (the tiny vocabulary is ~700 tokens, so it matters)."""
    tokenizer, _, model = tiny
    embeds, mask = inputs(tiny, ["text", "short_text"])
    kwargs = dict(attention_mask=mask, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                  max_new_tokens=16, min_new_tokens=16, do_sample=True)

    def draw(generate, **extra) -> torch.Tensor:
        torch.manual_seed(3)
        return generate(inputs_embeds=embeds, **kwargs, **extra)

    with torch.no_grad():
        for extra in ({}, {"temperature": 0.7, "top_p": 0.9}):
            ours = draw(model.language_model.generate, **extra)
            assert torch.equal(ours, draw(hf_model.generate, generation_mode="text", **extra)), extra
        unfiltered = draw(model.language_model.generate, top_k=0)
        greedy = model.language_model.generate(inputs_embeds=embeds, **{**kwargs, "do_sample": False})
    default = draw(model.language_model.generate)
    assert not torch.equal(default, unfiltered) and not torch.equal(default, greedy)


def test_deepseek_generate_from_input_ids(tiny, hf_model) -> None:
    """Given ids, generate returns them followed by the new ids, as transformers does; without an
    attention mask, pad ids are masked out (transformers infers the same mask)."""
    tokenizer, processor, model = tiny
    lm = model.language_model
    batch = processor.batchify([processor.process_one(conversations=CONVERSATIONS[n]) for n in ("text", "short_text")])
    ids, mask = batch.input_ids, batch.attention_mask
    assert not mask.all()  # left padding to mask
    kwargs = dict(max_new_tokens=10, eos_token_id=tokenizer.eos_token_id, pad_token_id=processor.pad_id)
    with torch.no_grad():
        ours = lm.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert torch.equal(ours, hf_model.generate(input_ids=ids, attention_mask=mask, generation_mode="text", **kwargs))
        assert torch.equal(lm.generate(input_ids=ids, **kwargs), ours)
        assert torch.equal(ours[:, : ids.shape[1]], ids)
        new = lm.generate(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=mask, **kwargs)
    assert torch.equal(ours[:, ids.shape[1]:], new) and new.shape == (2, 10)


def test_deepseek_generate_with_a_list_of_eos_ids(tiny, hf_model) -> None:
    """Each row stops at the first of several EOS ids; finished rows are padded with the first of
    them when no pad id is given, as transformers does."""
    tokenizer, _, model = tiny
    lm = model.language_model
    embeds, mask = inputs(tiny, ["text", "short_text"])
    with torch.no_grad():
        free = lm.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=None, max_new_tokens=12).tolist()
        stops = [tokenizer.eos_token_id, free[0][4], free[1][2]]
        ours = lm.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=stops, max_new_tokens=12)
        theirs = hf_model.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=stops, max_new_tokens=12,
                                   generation_mode="text")
    assert torch.equal(ours, theirs)
    ends = [next(i for i, t in enumerate(row) if t in stops) for row in free]
    assert ends[0] != ends[1] and ours.shape[1] == max(ends) + 1
    for row, end in zip(free, ends):
        assert row[: end + 1] + [stops[0]] * (max(ends) - end) in ours.tolist()


# --- the KV cache ----------------------------------------------------------------------------------

def test_cache_select_keeps_rows_that_decode_as_before(tiny) -> None:
    """Dropping or reordering rows of a filled cache: the kept rows go on exactly as in the batch."""
    _, _, model = tiny
    lm = model.language_model
    embeds, mask = inputs(tiny, ["text", "short_text"])
    B, T, _ = embeds.shape
    cache = lm.model.new_cache(B, T + 4)
    with torch.inference_mode():
        ids = prefill(lm, embeds, mask, cache).argmax(-1)
        position = mask.sum(-1, keepdim=True)
        ids = decode_step(lm, ids, position, cache).argmax(-1)
        position = position + 1
        for rows in ([1, 0], [1], [0]):
            kept = copy.deepcopy(cache)
            kept.select(torch.tensor(rows))
            assert kept.batch == len(rows) and kept.length == cache.length
            want = decode_step(lm, ids, position, copy.deepcopy(cache))[rows]
            got = decode_step(lm, ids[rows], position[rows], kept)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_open_ended_calls_grow_the_cache(tiny) -> None:
    """A cache made by a call without one (DeepSeek-style loops) starts at max(T, 16) positions and
    grows as tokens come, keeping every key, value and padding bit; a fixed cache refuses."""
    _, _, model = tiny
    lm = model.language_model
    g = torch.Generator().manual_seed(0)
    seq = lm.get_input_embeddings()(torch.randint(0, 600, (2, 3), generator=g))
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # a left-padded row: its pad must stay masked
    with torch.inference_mode():
        out = lm(inputs_embeds=seq, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        assert (cache.capacity, cache.growable) == (16, True)
        for step in range(30):
            nxt = lm.get_input_embeddings()(out.logits[:, -1].argmax(-1))[:, None]
            seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            out = lm(inputs_embeds=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            full = lm(inputs_embeds=seq, attention_mask=mask).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, rtol=0, atol=2e-5)
        assert cache.length == 33 and cache.capacity == 64  # grown twice: 16 -> 32 -> 64
        fixed = lm.model.new_cache(2, 3)
        lm(inputs_embeds=seq[:, :3], attention_mask=mask[:, :3], past_key_values=fixed)
        with pytest.raises(ValueError, match=r"KV cache full: 3 \+ 1 tokens > capacity 3"):
            lm(inputs_embeds=seq[:, 3:4], past_key_values=fixed)


def test_prompts_up_to_the_context_limit(tiny, hf_model) -> None:
    """A prompt that with max_new_tokens fills the whole context decodes as transformers does
    (RoPE and the cache at the last positions); one token more is refused."""
    _, _, model = tiny
    limit = model.config.language_config.max_position_embeddings
    ids = torch.randint(0, 600, (1, limit - 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.language_model.generate(input_ids=ids, eos_token_id=None, max_new_tokens=4)
        theirs = hf_model.generate(input_ids=ids, eos_token_id=None, max_new_tokens=4, do_sample=False,
                                   generation_mode="text")
    assert ours.shape == (1, limit) and torch.equal(ours, theirs)
    with pytest.raises(InputError, match=rf"{limit - 4} tokens \+ max_new_tokens 5 exceeds the model's context"):
        model.language_model.generate(input_ids=ids, max_new_tokens=5)


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


def filtered_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """The distribution sampling must follow, computed directly: softmax(logits / T) over the k
    likeliest tokens, then the smallest head of them whose mass reaches top_p, renormalised."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[: top_k or len(logits)]
    weights = [math.exp(logits[i] / temperature) for i in order]
    total, kept, mass = sum(weights), [], 0.0
    for i, w in zip(order, weights):
        if mass >= top_p:
            break
        kept.append((i, w))
        mass += w / total
    norm = sum(w for _, w in kept)
    return {i: w / norm for i, w in kept}


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 8, 0.6), (2.0, 0, 1.0)])
def test_sampled_tokens_follow_the_filtered_distribution(temperature: float, top_k: int, top_p: float) -> None:
    """40,000 draws from fixed logits: no token outside the allowed set, and each allowed token's
    frequency within 4.5 standard deviations of its probability."""
    logits = torch.randn(1, 60, generator=torch.Generator().manual_seed(1)) * 2
    want = filtered_distribution(logits[0].tolist(), temperature, top_k, top_p)
    assert 2 < len(want) < 60 or (top_k == 0 and top_p == 1.0)
    draws = 40_000
    ids = sample(logits.expand(draws, -1), SamplingParams(temperature, top_p, top_k),
                 torch.Generator().manual_seed(0))
    counts = torch.bincount(ids, minlength=60).tolist()
    assert {i for i, c in enumerate(counts) if c} <= set(want)
    for i, p in want.items():
        assert abs(counts[i] / draws - p) < 4.5 * math.sqrt(p * (1 - p) / draws) + 1e-9, (i, counts[i], p)


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
