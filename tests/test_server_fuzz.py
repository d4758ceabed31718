"""Schema fuzzing of the server's own OpenAPI document (schemathesis): generated and mutated
requests to every route get no 5xx, responses conform to the document, errors come in OpenAI's
shape, and the server still answers correctly afterwards.

The work each request may ask for is clamped (at most 8 new tokens, one image), so the run stays
short; everything else is as generated. `positive_data_acceptance` is left out: the document
cannot express every rule (turns must alternate, a system message comes first), and a request
breaking those is rightly a 400."""

from __future__ import annotations

import os

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from serving import LiveServer


# Generated requests per route (images: 8, each is 576 decoder steps). CI runs 40; a longer run
# (JANUSVL_FUZZ_EXAMPLES=1000) sends thousands.
EXAMPLES = int(os.environ.get("JANUSVL_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def live(janus):
    with LiveServer(janus) as server:
        yield server


def _clamp(case) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
            body[key] = min(body[key], 8)
    if "/images/" in case.path:
        body["n"] = 1  # each image is 576 decoder steps
    elif "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 8


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests(live, mode) -> None:
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/images/generations", "/v1/models",
                                              "/health", "/metrics"}
    calls = []
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to mutate: the GET routes take no input
        examples = 8 if "/images/" in operation.path else EXAMPLES

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def call(case) -> None:
            _clamp(case)
            response = case.call_and_validate(base_url=live.url, excluded_checks=[positive_data_acceptance],
                                              timeout=120)
            calls.append(response.status_code)
            assert response.status_code < 500, response.text
            if response.status_code >= 400 and case.path != "/health":
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]

        call()
    print(f"{mode.name}: {len(calls)} requests, statuses {sorted(set(calls))}")
    assert len(calls) >= 40
    if mode is GenerationMode.POSITIVE:
        assert calls.count(200) >= 10  # valid requests are served, not only refused
    else:
        assert all(400 <= status < 500 for status in calls)  # every broken request is refused


def test_server_is_healthy_after_fuzzing(live, janus) -> None:
    live.wait_idle(60)
    assert live.metric("janusvl_requests_running") == 0
    reply = live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == janus.chat("hi", max_new_tokens=6).text
