"""Faults: clients that hang up mid-stream, mid-prefill and mid-image, requests that raise inside
the engine's loop, an image job cancelled at step 300, SIGTERM under load.

After each fault the server must answer the next request correctly (greedy text equal to
`Janus.chat`'s), its running gauge must be back at 0, and nothing of the faulted requests may
stay alive: no request or job object, no KV cache, no image buffer (`Engine.stats()` counts what
is still referenced anywhere in the process, so this is memory released, not an RSS guess)."""

from __future__ import annotations

import gc
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import make_image
from janusvl.engine import Engine, Metrics, Progress
from janusvl.engine import jobs as engine_jobs
from serving import LiveServer, ServeProcess, data_url, png_bytes

PROBE = "hi"


@pytest.fixture(scope="module")
def live(janus):
    with LiveServer(janus) as server:
        yield server


def _released(live: LiveServer, timeout: float = 15) -> None:
    """Every request the server was given is gone, with its KV memory and image buffers."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        stats = live.engine.stats()
        held = (stats.waiting, stats.running, stats.rows, stats.requests_alive, stats.jobs_alive,
                stats.kv_caches, stats.kv_bytes, stats.image_bytes)
        if not any(held):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still held after the requests ended: {stats}")
        time.sleep(0.05)


def assert_recovered(live: LiveServer, janus) -> None:
    """The engine let go of everything, and the next request gets the library's answer."""
    live.wait_idle(30)
    assert live.metric("janusvl_requests_running") == 0
    _released(live)
    reply = live.client(timeout=120).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROBE}],
                                                  max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == janus.chat(PROBE, max_new_tokens=8).text
    live.wait_idle(30)
    _released(live)
    assert live.metric("janusvl_requests_running") == 0 and live.metric("janusvl_kv_cache_bytes") == 0


def _image_message(n_images: int, seed: int) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(make_image(64, 64, seed=seed + i)))}}
             for i in range(n_images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare these pictures."}]}]


def _wait(condition, timeout: float = 30, step: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the engine")
        time.sleep(step)


# ---------------------------------------------------------------------- clients that hang up

def test_disconnect_mid_stream(live, janus) -> None:
    stream = live.client(timeout=120).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Go on."}], max_tokens=1500, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    generated = live.metric("janusvl_generation_tokens_total")
    stream.close()
    assert_recovered(live, janus)
    # Dropped at once: far fewer tokens than asked for were drawn for it (8 more are the probe's).
    assert live.metric("janusvl_generation_tokens_total") - generated < 200


def test_disconnect_mid_prefill(live, janus) -> None:
    """Six images (3,500 prompt tokens, seconds of vision work on a CPU): the client hangs up
    while they are being encoded, and the engine stops between two vision blocks."""
    prompt_tokens = live.metric("janusvl_prompt_tokens_total")
    stream = live.client(timeout=120).chat.completions.create(model="tiny", messages=_image_message(6, seed=500),
                                                   max_tokens=4, temperature=0, stream=True)
    _wait(lambda: live.engine.stats().running == 1)  # admitted: the prefill is under way
    stream.close()
    live.wait_idle(30)
    assert live.metric("janusvl_prompt_tokens_total") == prompt_tokens  # the prefill never completed
    assert_recovered(live, janus)


def test_disconnect_while_waiting_for_a_whole_answer(live, janus) -> None:
    prompt_tokens = live.metric("janusvl_prompt_tokens_total")
    body = {"messages": _image_message(6, seed=600), "max_tokens": 4, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=body, timeout=0.3)
    live.wait_idle(30)
    assert live.metric("janusvl_prompt_tokens_total") == prompt_tokens
    assert_recovered(live, janus)


def test_disconnect_mid_image(live, janus) -> None:
    steps, images = live.metric("janusvl_image_generation_steps_total"), live.metric("janusvl_image_generations_total")
    with httpx.stream("POST", live.url + "/v1/images/generations", timeout=60,
                      json={"prompt": "a lighthouse", "n": 2, "seed": 5, "stream": True}) as response:
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "image_generation.progress":
                seen += 1
                if seen == 3:
                    break
    assert_recovered(live, janus)
    assert live.metric("janusvl_image_generations_total") == images
    assert live.metric("janusvl_image_generation_steps_total") - steps < 576


# ---------------------------------------------------------------------- an image cancelled at step 300

def _image_cancelled_at(engine: Engine, step: int) -> list[int]:
    """Generate an image, cancelling it from its own event for `step`; the steps reported."""
    request = engine.image_request("a red fox", seed=3)
    seen: list[int] = []

    def emit(event) -> None:
        if isinstance(event, Progress):
            seen.append(event.step)
            if event.step == step:
                request.cancel()

    request.emit = emit
    engine.submit(request)
    _wait(lambda: engine.idle and seen and seen[-1] >= step)
    return seen


def test_engine_cancels_an_image_job_at_step_300(janus) -> None:
    """Exactly: the request is cancelled from its own step-300 event, and the engine draws no
    step after it. (The tiny checkpoint generates 384x384 images: 576 steps.)"""
    engine = Engine(janus, metrics=Metrics()).start()
    try:
        assert _image_cancelled_at(engine, 300) == list(range(1, 301))
        gc.collect()  # the request and its callback refer to each other
        stats = engine.stats()
        assert (stats.requests_alive, stats.jobs_alive, stats.kv_caches, stats.image_bytes) == (0, 0, 0, 0)
    finally:
        engine.close(timeout=0)


def test_client_cancels_an_image_at_step_300(live, janus) -> None:
    images = live.metric("janusvl_image_generations_total")
    with httpx.stream("POST", live.url + "/v1/images/generations", timeout=60,
                      json={"prompt": "a red fox", "n": 1, "seed": 3, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("step", 0) >= 300:
                break
    assert_recovered(live, janus)
    assert live.metric("janusvl_image_generations_total") == images
    # The next image request gets exactly the library's images.
    expected = janus.generate_images("a red fox", n=1, seed=3)[0]
    got = live.client(timeout=120).images.generate(model="tiny", prompt="a red fox", n=1, extra_body={"seed": 3})
    from test_serve import _decode_png

    assert _decode_png(got.data[0].b64_json).convert("RGB").tobytes() == expected.tobytes()
    _released(live)


# ---------------------------------------------------------------------- faults inside the engine

def _chat_fault(monkeypatch, method: str) -> None:
    """Make ChatJob.`method` raise for requests whose stop strings hold "BOOM": `take` at the
    second decode step, `prefill` after its first piece (a vision block)."""
    original = getattr(engine_jobs.ChatJob, method)

    def faulty_take(self, hidden):
        if "BOOM" in self.request.stop and self.generated >= 2:
            raise RuntimeError("injected fault in take")
        return original(self, hidden)

    def faulty_prefill(self, pacer):
        if "BOOM" not in self.request.stop:
            return (yield from original(self, pacer))
        steps = original(self, pacer)
        next(steps, None)  # one piece of real work
        yield
        raise RuntimeError("injected fault in prefill")

    monkeypatch.setattr(engine_jobs.ChatJob, method, faulty_take if method == "take" else faulty_prefill)


def _image_fault(monkeypatch, method: str) -> None:
    """Make ImageJob.`method` raise for requests with seed 666 (`finish` as it is called, before
    its generator exists: the engine must still end the job it took off its lists)."""
    original = getattr(engine_jobs.ImageJob, method)

    def faulty(self, *args, **kwargs):
        if self.request.seed == 666:
            raise RuntimeError(f"injected fault in {method}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine_jobs.ImageJob, method, faulty)


def _assert_server_error(info: pytest.ExceptionInfo) -> None:
    error = info.value.response.json()["error"]
    assert info.value.status_code == 500 and error["type"] == "server_error" and "injected" in error["message"]


@pytest.mark.parametrize("method", ["prefill", "take"])
def test_a_chat_request_that_raises_fails_alone(live, janus, monkeypatch, method) -> None:
    _chat_fault(monkeypatch, method)
    healthy = ThreadPoolExecutor(1).submit(lambda: live.client(timeout=120).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=30, temperature=0))
    with pytest.raises(openai.InternalServerError) as info:
        live.client(timeout=120).chat.completions.create(model="tiny", messages=_image_message(1, seed=700),
                                              max_tokens=30, stop=["BOOM"])
    _assert_server_error(info)
    assert healthy.result(60).choices[0].message.content == janus.chat("hello", max_new_tokens=30).text
    # Streamed, the failure arrives as an error event in OpenAI's shape.
    stream = live.client(timeout=120).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=30, stop=["BOOM"], stream=True)
    with pytest.raises(openai.APIError, match="injected"):
        list(stream)
    assert_recovered(live, janus)


@pytest.mark.parametrize("method", ["take", "finish"])
def test_an_image_request_that_raises_fails_alone(live, janus, monkeypatch, method) -> None:
    """`take` raises at an image step, `finish` while the VQ decoder turns codes into pixels."""
    _image_fault(monkeypatch, method)
    with pytest.raises(openai.InternalServerError) as info:
        live.client(timeout=120).images.generate(model="tiny", prompt="a storm", n=2, extra_body={"seed": 666})
    _assert_server_error(info)
    assert_recovered(live, janus)


def test_a_fault_in_the_shared_decode_pass(live, janus, monkeypatch) -> None:
    """The batch's decoder pass itself raises once: every request in it fails (nothing tells
    whose fault it was), the loop goes on, and the next request is served."""
    original, calls = Engine._decode, []

    def decode(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault in the decode pass")
        return original(self)

    monkeypatch.setattr(Engine, "_decode", decode)
    with pytest.raises(openai.InternalServerError) as info:
        live.client(timeout=120).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on."}],
                                              max_tokens=50, temperature=0)
    _assert_server_error(info)
    monkeypatch.undo()
    assert_recovered(live, janus)


# ---------------------------------------------------------------------- SIGTERM under load

def test_sigterm_under_load_finishes_every_request_and_exits_zero(tiny_dir, janus) -> None:
    prompts = ["Go on.", "Tell me more about it.", "Why?"]
    expected = [janus.chat(p, max_new_tokens=150).text for p in prompts]
    picture_messages = _image_message(1, seed=800)
    picture_answer = janus.chat([{"role": "user", "content": [
        {"type": "image", "image": png_bytes(make_image(64, 64, seed=800))},
        {"type": "text", "text": "Compare these pictures."}]}], max_new_tokens=40).text
    image = janus.generate_images("a quiet harbour", n=1, seed=9)[0]
    server = ServeProcess(tiny_dir, "--drain-timeout", "120")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=180)
        with ThreadPoolExecutor(5) as pool:
            chats = [pool.submit(lambda p=p: "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model="ckpt", messages=[{"role": "user", "content": p}], max_tokens=150, temperature=0,
                    stream=True) if c.choices)) for p in prompts]
            with_picture = pool.submit(lambda: client.chat.completions.create(
                model="ckpt", messages=picture_messages, max_tokens=40, temperature=0).choices[0].message.content)
            generated = pool.submit(lambda: client.images.generate(model="ckpt", prompt="a quiet harbour", n=1,
                                                                   extra_body={"seed": 9}))
            _wait(lambda: _load(server.url) == 5, timeout=60, step=0.02)  # all five accepted
            server.proc.send_signal(signal.SIGTERM)
            _wait(lambda: httpx.get(server.url + "/health").status_code == 503, timeout=10, step=0.02)
            refused = httpx.post(server.url + "/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert [c.result(180) for c in chats] == expected
            assert with_picture.result(180) == picture_answer
            from test_serve import _decode_png

            got = _decode_png(generated.result(180).data[0].b64_json)
            assert got.convert("RGB").tobytes() == image.tobytes()
        assert server.proc.wait(60) == 0
    finally:
        server.close()


def _load(url: str) -> float:
    """Requests running plus waiting, from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return float(values["janusvl_requests_running"]) + float(values["janusvl_requests_waiting"])
