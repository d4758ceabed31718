"""The serving engine without HTTP: continuous batching is exact, prefill is interleaved with
decoding, and cancelled or finished requests leave nothing behind."""

from __future__ import annotations

import queue
import time

import torch

from conftest import make_image
from janusvl.engine import Delta, Engine, Failed, Finished, RowDone
from janusvl.generation.text import decode_step, prefill
from janusvl.models.kv_cache import RaggedBatch


class Listener:
    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.stamps: list[float] = []

    def __call__(self, event) -> None:
        if isinstance(event, Delta):
            self.stamps.append(time.perf_counter())
        self.events.put(event)

    def result(self, timeout: float = 60) -> tuple[str, list]:
        text, rest = "", []
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, Delta):
                text += event.text
            else:
                rest.append(event)
            if isinstance(event, (Finished, Failed)):
                return text, rest


def _prefilled(lm, prompts: list[torch.Tensor]) -> list:
    caches = []
    for embeds in prompts:
        cache = lm.model.new_cache(1, 40)
        prefill(lm, embeds, torch.ones(1, embeds.shape[1], dtype=torch.long), cache)
        caches.append(cache)
    return caches


def _ragged_step(lm, ids: torch.Tensor, caches: list) -> torch.Tensor:
    hidden = lm.model(inputs_embeds=lm.get_input_embeddings()(ids)[:, None], past_key_values=RaggedBatch(caches),
                      use_cache=True).last_hidden_state
    return lm.lm_head(hidden)[:, -1].float()


def test_ragged_batch_equals_each_cache_alone(tiny) -> None:
    """Rows of different lengths stepped together give each row its own logits."""
    _, _, model = tiny
    lm = model.language_model
    torch.manual_seed(0)
    prompts = [torch.randn(1, T, lm.config.hidden_size) for T in (5, 17, 9)]
    ids = torch.tensor([3, 7, 11])
    with torch.inference_mode():
        alone = _prefilled(lm, prompts)
        expected = [decode_step(lm, ids[i:i + 1], torch.tensor([[c.length]]), c) for i, c in enumerate(alone)]
        together = _prefilled(lm, prompts)
        got = _ragged_step(lm, ids, together)
        # A batch of one cache is exactly that cache alone.
        assert torch.equal(_ragged_step(lm, ids[:1], _prefilled(lm, prompts[:1])), expected[0])
    # Three rows share each matrix product, so only the products' rounding may differ (fp32).
    for i, want in enumerate(expected):
        assert (got[i:i + 1] - want).abs().max() <= 1e-5 * want.abs().max()
        assert got[i].argmax() == want[0].argmax()
    assert [c.length for c in together] == [6, 18, 10]
    for a, b in zip(alone, together, strict=True):  # and each cache holds what it would alone
        assert torch.allclose(a.k[0][:, :, :a.length], b.k[0][:, :, :b.length], atol=1e-6)


def test_prefill_is_chunked_between_decode_steps(janus) -> None:
    """With rows decoding, a long prompt goes in pieces: the running stream keeps producing
    tokens while the newcomer's prompt is prefilled, and both answers stay the library's."""
    engine = Engine(janus, prefill_budget_s=0.0).start()  # the smallest pieces
    try:
        story = [{"role": "user", "content": "Tell me a long story."}]
        long_prompt = [{"role": "user", "content": "why " * 300}]
        running = engine.chat_request(story, max_new_tokens=1800)
        running.emit = first = Listener()
        engine.submit(running)
        while not first.stamps:
            time.sleep(0.001)
        newcomer = engine.chat_request(long_prompt, max_new_tokens=5)
        newcomer.emit = second = Listener()
        submitted = time.perf_counter()
        engine.submit(newcomer)
        text, _ = second.result()
        running.cancel()
        # The references are computed with the engine at rest: two threads running torch at once
        # may split a product's sum differently (thread counts), which is not what is tested here.
        deadline = time.monotonic() + 10
        while not engine.idle and time.monotonic() < deadline:
            time.sleep(0.001)
        assert newcomer.prompt_tokens > 300
        during = [t for t in first.stamps if submitted < t < second.stamps[0]]
        chunks = [n for n, _ in engine.pacer.samples]
        assert len(chunks) >= 8 and max(chunks) <= 64  # the pacer's smallest pieces (budget 0)
        # A decode step follows each piece (a few steps give no text: held-back bytes).
        assert len(during) >= 0.8 * len(chunks)
        assert text == janus.chat(long_prompt, max_new_tokens=5).text
        streamed = "".join(e.text for e in list(first.events.queue) if isinstance(e, Delta))
        reference = janus.chat(story, max_new_tokens=400).text
        assert len(streamed) > 40 and reference.startswith(streamed)  # the story went on, unchanged
    finally:
        engine.close(timeout=0)


def test_cancel_and_finish_free_everything(janus) -> None:
    engine = Engine(janus).start()
    try:
        requests = [engine.chat_request("Go on and on.", max_new_tokens=1000) for _ in range(3)]
        listeners = []
        for request in requests:
            request.emit = listener = Listener()
            listeners.append(listener)
            engine.submit(request)
        # A job's first token is sent from the step that finishes its prefill, just before it joins
        # the running batch: wait for the batch itself.
        deadline = time.monotonic() + 30
        while not (all(listener.stamps for listener in listeners) and engine.running_rows == 3) \
                and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.running_rows == 3
        requests[1].cancel()
        deadline = time.monotonic() + 10
        while engine.running_rows != 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.running_rows == 2
        for request in requests:
            request.cancel()
        while not engine.idle and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.idle and engine.running_rows == 0
        short = engine.chat_request("Hi", max_new_tokens=4, n=2)
        short.emit = listener = Listener()
        engine.submit(short)
        _, events = listener.result()
        assert [e.finish_reason for e in events if isinstance(e, RowDone)] == ["length", "length"]
        assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 8
        deadline = time.monotonic() + 5  # Finished is sent from inside the step that ends the job
        while not engine.idle and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.idle
    finally:
        assert engine.close(timeout=5)


def test_prompts_that_start_alike_reuse_their_prefix(janus) -> None:
    """A prompt that starts like an earlier one (the system prompt and template) prefills only
    the rest: the common prefix's keys and values come from the prefix cache, a cached prefix
    stops before an image and before the prompt's last token, and every answer stays the
    library's. With no room for it (prefix_cache_mb=0) nothing is reused."""
    image = make_image(64, 48, seed=3)
    first = "What is in this picture?"
    second = "What colour is the sky?"
    with_image = [{"role": "user", "content": "<image_placeholder>\nLook at this.", "images": [image]}]
    ids = {text: janus.prompt(text).ids for text in (first, second)}
    common = next(i for i, (a, b) in enumerate(zip(ids[first], ids[second], strict=False)) if a != b)
    assert common >= 16  # the system prompt and the template
    engine = Engine(janus).start()
    reused = []
    restore = engine.prefixes.restore
    engine.prefixes.restore = lambda *args: reused.append(restore(*args)) or reused[-1]
    try:
        for messages in (first, second, with_image, second):
            request = engine.chat_request(messages, max_new_tokens=6)
            request.emit = listener = Listener()
            engine.submit(request)
            text, _ = listener.result()
            assert text == janus.chat(messages, max_new_tokens=6).text
        image_ids = janus.prompt(with_image).ids
        first_image = image_ids.index(janus.processor.image_id)
        assert reused[0] == 0 and reused[1] == common
        assert 16 <= reused[2] <= first_image  # the template before the image, never the image
        assert reused[3] == len(ids[second]) - 1  # all of it but the last token, cached by the second
        assert engine.stats().prefix_cache_bytes > 0
    finally:
        engine.close(timeout=5)
    engine = Engine(janus, prefix_cache_mb=0).start()
    try:
        assert engine.prefixes is None
        request = engine.chat_request(second, max_new_tokens=6)
        request.emit = listener = Listener()
        engine.submit(request)
        assert listener.result()[0] == janus.chat(second, max_new_tokens=6).text
    finally:
        engine.close(timeout=5)
