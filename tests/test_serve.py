"""`janusvl serve`: a real server on loopback driven by the official openai client.

Greedy answers must equal `Janus.chat` (the engine runs the library's own functions), images must
equal `generate_images` under the same seed, and concurrency, overload, disconnects, shutdown and
errors must behave as documented in README.md's serving section."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from janusvl import ContextLengthError, InputError

from conftest import make_image
from serving import LiveServer, ServeProcess, data_url, png_bytes

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def server(janus):
    with LiveServer(janus) as live:
        yield live


@pytest.fixture(scope="module")
def pictures() -> list[bytes]:
    return [png_bytes(make_image(96, 64, seed=3)), png_bytes(make_image(40, 120, "L", seed=4))]


def _openai_parts(text: str, images: list[bytes]) -> list[dict]:
    return [*({"type": "image_url", "image_url": {"url": data_url(im)}} for im in images),
            {"type": "text", "text": text}]


def _janus_parts(text: str, images: list[bytes]) -> list[dict]:
    return [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]


def _conversations(pictures: list[bytes]) -> dict[str, tuple[list[dict], list[dict]]]:
    """name -> (openai messages, the same conversation for Janus.chat)."""
    one, two = pictures[:1], pictures
    history = [("user", "Hello, who are you?"), ("assistant", "A small random model."), ("user", "Say more.")]
    return {
        "image_question": ([{"role": "user", "content": _openai_parts(QUESTION, one)}],
                           [{"role": "user", "content": _janus_parts(QUESTION, one)}]),
        "two_images": ([{"role": "user", "content": _openai_parts("Compare them.", two)}],
                       [{"role": "user", "content": _janus_parts("Compare them.", two)}]),
        "text_only": ([{"role": "user", "content": "Tell me a story."}],
                      [{"role": "user", "content": "Tell me a story."}]),
        "multi_turn": ([{"role": "system", "content": "Be brief."},
                        *({"role": r, "content": c} for r, c in history)],
                       [{"role": "system", "content": "Be brief."},
                        *({"role": r, "content": c} for r, c in history)]),
    }


@pytest.mark.parametrize("name", ["image_question", "two_images", "text_only", "multi_turn"])
def test_greedy_chat_equals_library(server, janus, pictures, name) -> None:
    ours, theirs = _conversations(pictures)[name]
    expected = janus.chat(theirs, max_new_tokens=24, temperature=0)
    client = server.client()
    reply = client.chat.completions.create(model="tiny", messages=ours, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens

    stream = client.chat.completions.create(model="tiny", messages=ours, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == expected.text
    assert sum(1 for d in deltas if d) > 1  # really streamed, not one final chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == [expected.finish_reason]
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens


def test_stop_strings_and_n(server, janus) -> None:
    prompt = [{"role": "user", "content": "Count with me."}]
    full = janus.chat(prompt, max_new_tokens=20, temperature=0).text
    stop = full[6:9]
    expected = janus.chat(prompt, max_new_tokens=20, temperature=0, stop=stop)
    assert expected.finish_reason == "stop" and expected.text == full[:full.index(stop)]
    reply = server.client().chat.completions.create(model="tiny", messages=prompt, max_tokens=20, temperature=0,
                                                    stop=[stop], n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert {c.message.content for c in reply.choices} == {expected.text}
    assert {c.finish_reason for c in reply.choices} == {"stop"}
    assert reply.usage.completion_tokens == 3 * expected.completion_tokens


def test_sixteen_concurrent_requests_each_get_their_own_answer(server, janus, pictures) -> None:
    jobs = []
    for i in range(16):
        text = f"Question {i}: " + "why " * (i * 3)
        images = pictures[:1] if i % 4 == 0 else []
        jobs.append((_openai_parts(text, images), _janus_parts(text, images), 8 + (i * 5) % 23))
    expected = [janus.chat([{"role": "user", "content": theirs}], max_new_tokens=n, temperature=0).text
                for _, theirs, n in jobs]
    client = server.client()

    def ask(job: tuple) -> str:
        ours, _, n = job
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ours}],
                                               max_tokens=n, temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == expected
    server.wait_idle()
    assert server.metric("janusvl_requests_running") == 0


def test_image_cache_gives_identical_answers(server, janus, pictures) -> None:
    picture = png_bytes(make_image(70, 50, seed=11))  # not sent by any other test
    messages = [{"role": "user", "content": _openai_parts(QUESTION, [picture])}]
    client = server.client()
    hits, misses = server.metric("janusvl_image_cache_hits_total"), server.metric("janusvl_image_cache_misses_total")
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert server.metric("janusvl_image_cache_misses_total") == misses + 1
    assert server.metric("janusvl_image_cache_hits_total") == hits + 1
    expected = janus.chat([{"role": "user", "content": _janus_parts(QUESTION, [picture])}], max_new_tokens=16)
    assert first.choices[0].message.content == second.choices[0].message.content == expected.text


def _decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_images_equal_library_with_the_same_seed(server, janus) -> None:
    expected = janus.generate_images("a red fox", n=2, seed=7)
    result = server.client().images.generate(model="tiny", prompt="a red fox", n=2, size="384x384",
                                             response_format="b64_json", extra_body={"seed": 7})
    assert len(result.data) == 2
    for item, want in zip(result.data, expected, strict=True):
        got = _decode_png(item.b64_json)
        assert got.format == "PNG" and got.size == (384, 384)
        assert got.convert("RGB").tobytes() == want.tobytes()


def test_streamed_image_reports_progress_and_chat_is_not_stalled(server) -> None:
    events: list[tuple[float, dict]] = []
    started = threading.Event()

    def generate() -> None:
        with httpx.stream("POST", server.url + "/v1/images/generations", timeout=300,
                          json={"prompt": "a lighthouse", "n": 1, "seed": 1, "stream": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append((time.perf_counter(), json.loads(line[6:])))
                    started.set()

    worker = threading.Thread(target=generate)
    worker.start()
    assert started.wait(60)
    stream = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=4, temperature=0, stream=True)
    first_token = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first_token is None:
            first_token = time.perf_counter()
    worker.join(300)
    progress = [e for _, e in events if e["type"] == "image_generation.progress"]
    done = [(t, e) for t, e in events if e["type"] == "image_generation.completed"]
    assert progress and progress[-1]["step"] == progress[-1]["total"] == 576
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    assert len(done) == 1 and _decode_png(done[0][1]["b64_json"]).size == (384, 384)
    assert first_token is not None and first_token < done[0][0]


def test_bad_requests_get_openai_errors(server) -> None:
    client = server.client()
    cases = [
        (lambda: client.images.generate(model="tiny", prompt="x", size="512x512"), 400, "size"),
        (lambda: client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(b"not an image at all")}}]}]), 400, "messages"),
        (lambda: client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]), 400, "image_url"),
        (lambda: client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}]}]), 400, "image_url"),
        (lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=10**6), 400, None),
        (lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                n=9), 400, "n"),
        (lambda: client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}]),
         404, "model"),
    ]
    for call, status, param in cases:
        with pytest.raises(openai.APIStatusError) as info:
            call()
        error = info.value.response.json()["error"]
        assert info.value.status_code == status, error
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param:
            assert param in (error["param"] or ""), error
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert "context" in info.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:  # remote images are off by default
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert "--allow-remote-images" in info.value.response.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_context_length_exceeded_is_openais_error(server, janus) -> None:
    """A prompt and max_tokens beyond the context: 400, code context_length_exceeded, the counts
    named; the library raises the same check as ContextLengthError (an InputError)."""
    client = server.client()
    context = janus.model.config.language_config.max_position_embeddings
    prompt_tokens = len(janus.prompt([{"role": "user", "content": "hi"}], plain_text=True).ids)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=context)
    error = info.value.response.json()["error"]
    assert error == {"type": "invalid_request_error", "param": "max_tokens", "code": "context_length_exceeded",
                     "message": f"prompt of {prompt_tokens} tokens + max_tokens {context} exceeds the model's "
                                f"context of {context} tokens (max_position_embeddings); lower max_tokens to "
                                f"at most {context - prompt_tokens}"}
    with pytest.raises(ContextLengthError) as lib:
        janus.chat("hi", max_new_tokens=context)
    assert isinstance(lib.value, InputError)
    assert (lib.value.prompt_tokens, lib.value.new_tokens, lib.value.context) == (prompt_tokens, context, context)
    # max_completion_tokens is named as sent; a prompt that alone overflows names the messages.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=context)
    assert "+ max_completion_tokens" in info.value.response.json()["error"]["message"]
    long = "why " * (context + 10)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], stream=stream)
        error = info.value.response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert re.search(rf"the prompt alone needs \d+ tokens and the context holds {context}; shorten the text "
                         r"by \d+ tokens$", error["message"]), error
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="tiny", prompt=long)
    error = info.value.response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    assert f"with 576 image tokens that exceeds the model's context of {context}" in error["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_body_limit_gives_413(janus) -> None:
    with LiveServer(janus, max_body_bytes=4096) as live:
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
        response = httpx.post(live.url + "/v1/chat/completions", json=big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        chunks = iter([json.dumps(big).encode()[i:i + 1000] for i in range(0, 6000, 1000)])
        streamed = httpx.post(live.url + "/v1/chat/completions", content=chunks,  # no Content-Length
                              headers={"content-type": "application/json"})
        assert streamed.status_code == 413


def test_api_key_required_except_health(janus) -> None:
    with LiveServer(janus, api_key="s3cret") as live:
        assert httpx.get(live.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            response = httpx.get(live.url + path)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
            assert httpx.get(live.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            live.client("wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        reply = live.client("s3cret").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        assert reply.choices[0].message.content == janus.chat("hi", max_new_tokens=3).text
        assert [m.id for m in live.client("s3cret").models.list().data] == ["tiny"]


def _long_stream(live: LiveServer, max_tokens: int = 1500):
    return live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on."}],
                                                 max_tokens=max_tokens, temperature=0, stream=True)


def test_full_queue_gives_429_and_admitted_requests_complete(janus) -> None:
    with LiveServer(janus, engine_options={"max_batch": 1, "max_queue": 1}) as live:
        running = _long_stream(live, 400)
        next(iter(running))  # admitted and decoding
        waiting = ThreadPoolExecutor(1).submit(
            lambda: live.client().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Me next."}], max_tokens=5, temperature=0))
        deadline = time.monotonic() + 10
        while live.metric("janusvl_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as info:
            live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Me too."}],
                                                  max_tokens=5)
        assert info.value.response.headers["retry-after"]
        assert info.value.response.json()["error"]["code"] == "queue_full"
        finish = [c.choices[0].finish_reason for c in running if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"]
        assert waiting.result(60).usage.completion_tokens == janus.chat("Me next.", max_new_tokens=5).completion_tokens
        rejected = httpx.get(live.url + "/metrics").text
        assert 'janusvl_rejected_requests_total{reason="queue_full"} 1.0' in rejected


def test_disconnected_clients_leave_nothing_running(janus) -> None:
    with LiveServer(janus) as live:
        stream = _long_stream(live)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # the client goes away mid-stream
        live.wait_idle(10)
        assert live.metric("janusvl_requests_running") == 0
        # A waiting (non-streamed) client that hangs up is dropped too. Greedy, so the answer is known to run
        # to max_tokens (a sampled one may meet EOS before the client gives up).
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/chat/completions", timeout=0.5,
                       json={"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1500,
                             "temperature": 0})
        live.wait_idle(10)
        assert live.metric("janusvl_requests_running") == 0
        # The next request is served as usual (greedy: a sampled answer may end early at EOS).
        reply = live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=3, temperature=0)
        expected = janus.chat("hi", max_new_tokens=3)
        assert (reply.choices[0].message.content, reply.usage.completion_tokens) == \
            (expected.text, expected.completion_tokens)


def test_an_exception_in_one_request_fails_only_that_request(janus, monkeypatch) -> None:
    from janusvl.engine import jobs

    original = jobs.ChatJob.take

    def take(self, hidden):
        if "BOOM" in self.request.stop and self.generated >= 2:
            raise RuntimeError("injected fault")
        return original(self, hidden)

    monkeypatch.setattr(jobs.ChatJob, "take", take)
    with LiveServer(janus) as live:
        healthy = ThreadPoolExecutor(1).submit(lambda: live.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=40, temperature=0))
        with pytest.raises(openai.InternalServerError) as info:
            live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=40, stop=["BOOM"])
        assert info.value.response.json()["error"]["type"] == "server_error"
        assert healthy.result(60).usage.completion_tokens == 40
        live.wait_idle(10)
        assert live.metric("janusvl_requests_running") == 0


def test_sigterm_drains_running_requests_then_exits_zero(tiny_dir) -> None:
    server = ServeProcess(tiny_dir, "--drain-timeout", "60")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "Go on."}],
                                                max_tokens=600, temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(server.url + "/health").status_code == 503
        refused = httpx.post(server.url + "/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert refused.status_code == 503
        rest = list(chunks)
        assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
        assert server.proc.wait(60) == 0
    finally:
        server.close()
