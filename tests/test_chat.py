"""The high-level API (`Janus.chat`, `chat_batch`, streaming) and DeepSeek's own inference script."""

from __future__ import annotations

import base64
import gc
import inspect
import io
import weakref

import pytest
import torch

from conftest import EOS_PROMPT, EOS_STEP, make_image
from janusvl import InputError, Janus, MultiModalityCausalLM, VLChatProcessor, load_pil_images
from janusvl.api import ChatResult
from janusvl.generation.sampling import SamplingParams
from janusvl.generation.stream import TextStream
from janusvl.generation.text import generate_tokens
from janusvl.processing import DEFAULT_SYSTEM_PROMPT
from janusvl.testing.tokenizer import EOS, write_processor_configs, write_tokenizer

IMAGE = make_image(96, 64, seed=21)


def user(*parts: object) -> dict:
    """An OpenAI-style user message; str parts are text, anything else an image."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
    return {"role": "user", "content": content}


def tokens_of(janus: Janus, messages: list) -> list[int]:
    prompt, images = janus.build_prompt(messages)
    return janus.processor.process_one(prompt=prompt, images=images).input_ids.tolist()


# --- prompts -----------------------------------------------------------------------------------

def test_openai_and_deepseek_messages_give_the_same_prompt_and_answer(janus) -> None:
    openai = [user(IMAGE, "Describe this image.")]
    deepseek = [{"role": "<|User|>", "content": "<image_placeholder>\nDescribe this image.", "images": [IMAGE]},
                {"role": "<|Assistant|>", "content": ""}]
    prompt, images = janus.build_prompt(openai)
    assert prompt == f"{DEFAULT_SYSTEM_PROMPT}\n\n<|User|>: <image_placeholder>\nDescribe this image.\n\n<|Assistant|>:"
    assert images == [IMAGE] and janus.build_prompt(deepseek) == (prompt, [IMAGE])
    a, b = janus.chat(openai, max_new_tokens=6), janus.chat(deepseek, max_new_tokens=6)
    assert a == b and a.prompt_tokens == len(tokens_of(janus, openai)) > 576


def test_every_image_source_form_reads_the_same_pixels(janus, tmp_path) -> None:
    buf = io.BytesIO()
    IMAGE.save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    parts = [{"type": "image", "image": IMAGE}, {"type": "image", "image": str(path)},
             {"type": "image", "image": buf.getvalue()}, {"type": "image_url", "image_url": {"url": data_url}},
             {"type": "image_url", "image_url": {"url": f"file://{path}"}}]
    prompt, images = janus.build_prompt([{"role": "user", "content": [*parts, {"type": "text", "text": "Same?"}]}])
    assert prompt.endswith("<|User|>: " + "<image_placeholder>\n" * 5 + "Same?\n\n<|Assistant|>:")
    pixels = janus.processor.process_one(prompt=prompt, images=images).pixel_values
    assert pixels.shape[0] == 5 and all(torch.equal(pixels[0], p) for p in pixels[1:])


def test_system_message_and_multi_turn_prompt(janus) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, user("What now?", IMAGE)]
    prompt, images = janus.build_prompt(messages)
    assert prompt == ("You are terse.\n\n<|User|>: Hi\n\n<|Assistant|>: Hello!" + EOS
                      + "<|User|>: What now?\n<image_placeholder>\n\n<|Assistant|>:")
    assert images == [IMAGE]
    # an empty system message removes the system prompt altogether
    assert janus.build_prompt([{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}])[0] \
        == "<|User|>: Hi\n\n<|Assistant|>:"


def test_roles_come_from_the_checkpoint_and_can_be_overridden(janus, tiny, tmp_path) -> None:
    assert janus.roles == ("<|User|>", "<|Assistant|>")
    write_tokenizer(tmp_path, roles="1.3b")
    write_processor_configs(tmp_path)
    v1 = Janus(tiny[2], VLChatProcessor.from_pretrained(tmp_path))
    assert v1.roles == ("User", "Assistant")
    assert v1.build_prompt("Hi")[0] == f"{DEFAULT_SYSTEM_PROMPT}\n\nUser: Hi\n\nAssistant:"
    result = v1.chat("Hi", max_new_tokens=3)
    assert result.completion_tokens == 3 and result.prompt_tokens == len(v1.tokenizer.encode(v1.build_prompt("Hi")[0]))
    assert janus.build_prompt("Hi", roles=("User", "Assistant")) == v1.build_prompt("Hi")
    assert janus.chat("Hi", max_new_tokens=4, roles=("User", "Assistant")) != janus.chat("Hi", max_new_tokens=4)


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "Hi"}], "expected a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"messages\[1\]: expected a assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "ends with an assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "system message must come before"),
    ([{"role": "bot", "content": "a"}], "unknown role 'bot'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], r"content\[0\]: expected a part of type"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "image part has no image"),
    ([{"role": "user", "content": "<image_placeholder> what?"}], r"1 <image_placeholder> tag\(s\) but 0 image"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}], "images": [IMAGE]}], "not both"),
])
def test_bad_messages_are_input_errors(janus, messages: list, match: str) -> None:
    with pytest.raises(InputError, match=match):
        janus.chat(messages, max_new_tokens=2)


# --- stopping ----------------------------------------------------------------------------------

def test_stops_at_the_checkpoints_eos(janus, eos_model) -> None:
    model, base = eos_model
    result = Janus(model, janus.processor).chat(EOS_PROMPT, max_new_tokens=20)
    assert result.finish_reason == "stop" and result.completion_tokens == EOS_STEP + 1
    assert result.text == janus.tokenizer.decode(base[:EOS_STEP], skip_special_tokens=True)


def test_length_limit(janus, eos_model) -> None:
    _, base = eos_model
    result = janus.chat(EOS_PROMPT, max_new_tokens=7)
    assert result == ChatResult(janus.tokenizer.decode(base[:7], skip_special_tokens=True), "length",
                                len(tokens_of(janus, [user(EOS_PROMPT)])), 7)
    with pytest.raises(InputError, match="exceeds the model's context"):
        janus.chat(EOS_PROMPT, max_new_tokens=10**6, stream=True)  # raised at the call, not at next()


def test_stop_strings_cut_the_text(janus, eos_model) -> None:
    _, base = eos_model
    full = janus.tokenizer.decode(base, skip_special_tokens=True)
    start = next(i for i in range(8, len(full)) if full.find(full[i:i + 3]) == i)
    stop = full[start:start + 3]
    # generation ends at the token that completes the stop string
    needed = next(n for n in range(1, 25) if stop in janus.tokenizer.decode(base[:n], skip_special_tokens=True))
    result = janus.chat(EOS_PROMPT, max_new_tokens=24, stop=["no such text", stop])
    assert result.text == full[:start] and result.finish_reason == "stop"
    assert result.completion_tokens == needed < 24
    streamed = janus.chat(EOS_PROMPT, max_new_tokens=24, stop=[stop], stream=True)
    assert "".join(streamed) == full[:start] and streamed.result == result


# --- streaming, sampling, batching -------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"temperature": 1.0, "seed": 3},
                                    {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 5}])
def test_stream_equals_non_stream(janus, kwargs: dict) -> None:
    messages = [user("Tell me a story about a café in 日本.")]
    result = janus.chat(messages, max_new_tokens=40, **kwargs)
    stream = janus.chat(messages, max_new_tokens=40, stream=True, **kwargs)
    chunks = list(stream)
    assert "".join(chunks) == result.text and stream.result == result
    assert len(chunks) > 5


def test_stream_close_keeps_what_was_produced_and_frees_the_generation(janus, eos_model, monkeypatch) -> None:
    """Closing after two chunks: the result holds exactly the tokens decoded so far, and the
    token generator and its KV cache are released at once."""
    _, base = eos_model  # the greedy ids of EOS_PROMPT
    decoder, caches = janus.model.language_model.model, []
    new_cache = decoder.new_cache
    monkeypatch.setattr(decoder, "new_cache", lambda *a, **kw: caches.append(new_cache(*a, **kw)) or caches[-1])
    stream = janus.chat(EOS_PROMPT, max_new_tokens=30, stream=True)
    first = [next(stream), next(stream)]
    steps, cache = stream._run._steps, weakref.ref(caches.pop())
    stream.close()
    # the tokens it took to give two non-empty chunks, by the same detokenizer rules
    text, needed = TextStream(janus.tokenizer), 0
    while len([c for c in [text.push(t) for t in base[:needed]] if c]) < 2:
        text, needed = TextStream(janus.tokenizer), needed + 1
    assert stream.result == ChatResult("".join(first), "length", stream.result.prompt_tokens, needed)
    assert stream.text == "".join(first) == janus.tokenizer.decode(base[:needed], skip_special_tokens=True)
    assert inspect.getgeneratorstate(steps) == inspect.GEN_CLOSED
    gc.collect()
    assert cache() is None
    with pytest.raises(StopIteration):
        next(stream)


def test_seeded_sampling_is_reproducible(janus) -> None:
    def ask(**kw: object) -> str:
        return janus.chat(EOS_PROMPT, max_new_tokens=16, temperature=1.0, **kw).text

    assert ask(seed=1) == ask(seed=1)
    assert ask(seed=1) != ask(seed=2)
    # top_k 1 leaves only the argmax: sampling must give the greedy answer
    assert ask(seed=1, top_k=1) == janus.chat(EOS_PROMPT, max_new_tokens=16).text


TEXT_BATCH = ["What is this?", [{"role": "system", "content": ""}, user("Tell me a story about a café in 日本.")]]
BATCH = [TEXT_BATCH[0], [user(IMAGE, "Describe this image.")], TEXT_BATCH[1]]


def test_chat_batch_equals_one_by_one(janus) -> None:
    """Greedy, no stop strings: every row decodes 40 tokens and equals its conversation alone."""
    batched = janus.chat_batch(BATCH, max_new_tokens=40)
    assert batched == [janus.chat(c, max_new_tokens=40) for c in BATCH]
    assert [r.completion_tokens for r in batched] == [40] * 3 and all(len(r.text) > 20 for r in batched)
    assert len({r.prompt_tokens for r in batched}) == 3  # really left-padded rows of different lengths


def test_chat_batch_rows_stop_on_their_own(janus, eos_model) -> None:
    """Rows end at their own EOS or stop string; the others go on, unchanged by that."""
    model, _ = eos_model  # answers with EOS often: each row of this batch ends at another step
    biased = Janus(model, janus.processor)
    conversations = [EOS_PROMPT, "Hi", *TEXT_BATCH]
    batched = biased.chat_batch(conversations, max_new_tokens=24)
    assert batched == [biased.chat(c, max_new_tokens=24) for c in conversations]
    assert {r.finish_reason for r in batched} == {"stop"} and batched[0].completion_tokens == EOS_STEP + 1
    assert len({r.completion_tokens for r in batched}) == 4
    # a stop string from the middle of row 0's answer that row 1 never produces
    free = janus.chat_batch(TEXT_BATCH, max_new_tokens=24)
    text = free[0].text
    stop = next(text[i:i + 3] for i in range(8, len(text) - 3)
                if text.find(text[i:i + 3]) == i and text[i:i + 3] not in free[1].text)
    stopped = janus.chat_batch(TEXT_BATCH, max_new_tokens=24, stop=[stop])
    assert stopped == [janus.chat(c, max_new_tokens=24, stop=[stop]) for c in TEXT_BATCH]
    assert stopped[0].text == text[:text.find(stop)] and stopped[0].finish_reason == "stop"
    assert stopped[0].completion_tokens < 24 and stopped[1] == free[1] and free[1].finish_reason == "length"


def test_chat_batch_samples_each_row_from_its_own_distribution(janus) -> None:
    """Seeded sampling in a batch: reproducible, and every token drawn is among the top 3 of the
    logits its own conversation gives alone (row mix-ups or padding leaks would leave that set)."""
    conversations = TEXT_BATCH
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=3, seed=11)
    batched = janus.chat_batch(conversations, **kw)
    assert batched == janus.chat_batch(conversations, **kw) != janus.chat_batch(conversations, **{**kw, "seed": 12})
    processor, model = janus.processor, janus.model
    outs = [processor.process_one(prompt=janus.build_prompt(c)[0]) for c in conversations]
    batch = processor.batchify(outs)
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(**batch)
        steps = generate_tokens(model.language_model, embeds, batch.attention_mask, 16, janus.tokenizer.eos_token_id,
                                SamplingParams(temperature=1.0, top_k=3), seed=11)
        drawn = torch.stack([ids for ids, _ in steps], dim=1)  # [2, 16]
        assert [janus.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in drawn] \
            == [r.text for r in batched]
        for out, row in zip(outs, drawn):
            ids = torch.cat([out.input_ids, row])[None]
            logits = model.language_model(input_ids=ids).logits[0, len(out.input_ids) - 1 : -1]
            top3 = logits.topk(3, dim=-1).indices
            assert (top3 == row[:, None]).any(-1).all()
            assert not (logits.argmax(-1) == row).all()  # sampled, not greedy


# --- DeepSeek's inference script ----------------------------------------------------------------

def test_deepseek_inference_script_runs_unchanged(tiny_dir, hf_model_bf16, tmp_path) -> None:
    """DeepSeek's inference.py with only the imports changed (no .cuda(): this is a CPU test, and
    max_new_tokens capped at 32 to keep it short); transformers' generate, given the same
    embeddings and arguments, gives the same bf16 ids."""
    image_path = tmp_path / "equation.png"
    IMAGE.save(image_path)

    # ---- from DeepSeek's inference.py ----
    model_path = str(tiny_dir)
    vl_chat_processor: VLChatProcessor = VLChatProcessor.from_pretrained(model_path)
    tokenizer = vl_chat_processor.tokenizer

    vl_gpt: MultiModalityCausalLM = MultiModalityCausalLM.from_pretrained(model_path, trust_remote_code=True)
    vl_gpt = vl_gpt.to(torch.bfloat16).eval()

    conversation = [
        {
            "role": "<|User|>",
            "content": "<image_placeholder>\nConvert the formula into latex code.",
            "images": [str(image_path)],
        },
        {"role": "<|Assistant|>", "content": ""},
    ]

    pil_images = load_pil_images(conversation)
    prepare_inputs = vl_chat_processor(
        conversations=conversation, images=pil_images, force_batchify=True
    ).to(vl_gpt.device)

    inputs_embeds = vl_gpt.prepare_inputs_embeds(**prepare_inputs)

    outputs = vl_gpt.language_model.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=prepare_inputs.attention_mask,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=32,
        do_sample=False,
        use_cache=True,
    )

    answer = tokenizer.decode(outputs[0].cpu().tolist(), skip_special_tokens=True)
    print(f"{prepare_inputs['sft_format'][0]}", answer)
    # ---- end ----

    assert prepare_inputs["sft_format"][0].endswith(
        "<|User|>: <image_placeholder>\nConvert the formula into latex code.\n\n<|Assistant|>:")
    assert vl_gpt.dtype == torch.bfloat16 and inputs_embeds.dtype == torch.bfloat16
    with torch.inference_mode():
        theirs = hf_model_bf16.generate(
            inputs_embeds=inputs_embeds, attention_mask=prepare_inputs.attention_mask, generation_mode="text",
            pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, max_new_tokens=32, do_sample=False, use_cache=True)
    assert torch.equal(outputs, theirs) and outputs.shape == (1, 32)
    assert len(set(outputs[0].tolist())) >= 5 and answer == tokenizer.decode(theirs[0], skip_special_tokens=True)
