"""Suite 3, the server's part: every case of the hostile HTTP corpus (tests/hostile_http.py) and
the raw-socket cases below get their expected status and OpenAI-shaped error, nothing crashes,
slow clients are cut off without holding up others, and the server answers correctly after."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from hostile_http import BODY_LIMIT, MAX_PIXELS, Case, cases
from hostile_report import Outcome, record, table
from serving import LiveServer

READ_TIMEOUT = 2.0  # seconds a client has to send a request's head, and then its body


@pytest.fixture(scope="module")
def live(janus):
    with LiveServer(janus, max_body_bytes=BODY_LIMIT, max_image_pixels=MAX_PIXELS,
                    read_timeout=READ_TIMEOUT) as server:
        yield server


def _outcome(case: str, group: str, ok: bool, crashed: bool, got: str, refused: bool = True) -> Outcome:
    return Outcome("server", group, case, ok, crashed, got, refused)


def _error_of(response: httpx.Response) -> dict | None:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} else None


def _send(client: httpx.Client, case: Case) -> Outcome:
    try:
        response = client.request(case.method, case.path, content=case.body, headers=case.headers)
    except httpx.HTTPError as exc:  # no answer at all: the server dropped the connection
        return _outcome(case.name, case.group, False, True, f"{type(exc).__name__}: {exc}")
    error = _error_of(response) if response.status_code >= 400 else None
    got = f"{response.status_code} {error['code'] if error else ''}".strip()
    if case.status >= 400:  # refused: in OpenAI's shape, with the expected code and a message
        ok = error is not None and error["code"] == case.code and bool(error["message"])
    else:
        ok = True
    ok = ok and response.status_code == case.status
    return _outcome(case.name, case.group, ok, response.status_code >= 500, got, case.status >= 400)


def test_hostile_corpus(live, janus) -> None:
    corpus = cases()
    assert len(corpus) >= 100 and len({c.name for c in corpus}) == len(corpus)  # names identify cases
    with httpx.Client(base_url=live.url, timeout=60) as client:
        outcomes = [_send(client, case) for case in corpus]
    raw = _raw_outcomes(live)
    everything = [record(o) for o in outcomes + raw]  # into the combined table (conftest prints it)
    print("\n" + table(everything))
    wrong = [f"{o.case}: got {o.got}" for o in everything if not o.ok]
    assert not wrong, "\n".join(wrong)
    _assert_healthy(live, janus)


def _assert_healthy(live: LiveServer, janus) -> None:
    live.wait_idle(60)
    assert live.metric("janusvl_requests_running") == 0
    reply = live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == janus.chat("hi", max_new_tokens=6).text


# ---------------------------------------------------------------------- raw sockets

def _connect(live: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", live.port), timeout=READ_TIMEOUT + 5)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or the socket's timeout)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _final(reply: bytes) -> tuple[bytes, bytes]:
    """(head, body) of the first final response in a raw reply (after any "100 Continue")."""
    while reply.startswith(b"HTTP/1.1 100 "):
        reply = reply.partition(b"\r\n\r\n")[2]
    head, _, rest = reply.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), len(rest))
    return head, rest[:length]


def _status(reply: bytes) -> int | None:
    head, _ = _final(reply)
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else None


def _trickle(live: LiveServer, head: bytes, tail: bytes, interval: float = 0.2) -> tuple[bytes, float, bool]:
    """Send `head`, then `tail` one byte per `interval`, reading what the server says, until it
    closes the connection or READ_TIMEOUT + 6 s pass. Returns (what the server answered, seconds
    until it closed, whether it closed)."""
    with _connect(live) as sock:
        started = time.monotonic()
        sock.sendall(head)
        sock.settimeout(interval)
        reply, rest = b"", iter(tail)
        while (elapsed := time.monotonic() - started) < READ_TIMEOUT + 6:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:  # nothing said: send the next byte, if any
                byte = next(rest, None)
                try:
                    if byte is not None:
                        sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    return reply, elapsed, True
                continue
            except ConnectionResetError:
                return reply, elapsed, True
            if not chunk:  # the server closed the connection
                return reply, elapsed, True
            reply += chunk
        return reply, elapsed, False


RequestHead = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


def _slow_cases(live: LiveServer) -> list[Outcome]:
    """Slow-loris: each is cut off within the read timeout (plus slack), with a 408 when a
    request's head arrived, while a normal request made meanwhile is answered at once."""
    slow = {
        "slow-loris: headers trickled": (RequestHead, b"X-Slow: " + b"a" * 200, None),
        "slow-loris: request line trickled": (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 4, None),
        "slow-loris: body trickled": (RequestHead + b"Content-Type: application/json\r\nContent-Length: "
                                      + str(len(BODY) + 100).encode() + b"\r\n\r\n", BODY + b" " * 100, 408),
        "slow-loris: connected, silent": (b"", b"", None),
        "slow-loris: Expect 100-continue, no body": (RequestHead + b"Content-Type: application/json\r\n"
                                                     b"Expect: 100-continue\r\nContent-Length: 50\r\n\r\n", b"", 408),
    }
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(len(slow) * 4) as pool:
        # Four of each at once: a slow client must not hold anything others need.
        futures = {pool.submit(_trickle, live, head, tail): (name, status)
                   for name, (head, tail, status) in slow.items() for _ in range(4)}
        time.sleep(0.3)
        began = time.monotonic()
        response = httpx.get(live.url + "/health", timeout=5)
        others_waited = time.monotonic() - began
        for future, (name, status) in futures.items():
            reply, seconds, closed = future.result()
            ok = closed and seconds < READ_TIMEOUT + 4 and (status is None or _status(reply) == status)
            if status == 408:
                ok = ok and _error_of_raw(reply) == "request_timeout"
            outcomes.append(_outcome(name, "slow client", ok, not closed, f"{_status(reply)} after {seconds:.1f} s"))
    outcomes.append(_outcome("a normal request during slow-loris", "slow client",
                            response.status_code == 200 and others_waited < 1.0, response.status_code >= 500,
                            f"{response.status_code} in {others_waited:.2f} s", refused=False))
    return _dedupe(outcomes)


def _dedupe(outcomes: list[Outcome]) -> list[Outcome]:
    """One outcome per case name: ok only if every copy was."""
    merged: dict[str, Outcome] = {}
    for o in outcomes:
        seen = merged.get(o.case)
        merged[o.case] = o if seen is None or not seen.ok else seen
    return list(merged.values())


def _error_of_raw(reply: bytes) -> str | None:
    """The error code of a raw reply in OpenAI's shape, None when it is not in that shape."""
    try:
        error = json.loads(_final(reply)[1])["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error.get("code") if set(error) == {"message", "type", "param", "code"} else None


JSON_HEAD = RequestHead + b"Content-Type: application/json\r\n"
INVALID = (400, "invalid_http")
# name -> (bytes sent, expected status, expected error code)
MALFORMED = {
    "TLS ClientHello on the plain port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), *INVALID),
    "binary garbage": (bytes(range(256)), *INVALID),
    "no HTTP version": (b"GET /health\r\n\r\n", *INVALID),
    "HTTP/1.1 without Host": (b"GET /health HTTP/1.1\r\n\r\n", *INVALID),
    "Content-Length and chunked together": (JSON_HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                            b"0\r\n\r\n", *INVALID),
    "negative Content-Length": (JSON_HEAD + b"Content-Length: -1\r\n\r\n", *INVALID),
    "non-numeric Content-Length": (JSON_HEAD + b"Content-Length: ten\r\n\r\n", *INVALID),
    "two different Content-Lengths": (JSON_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc", *INVALID),
    "bad chunk size": (JSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", *INVALID),
    "NUL in a header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", *INVALID),
    "space before the colon": (b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", *INVALID),
    "header line without a colon": (b"GET /health HTTP/1.1\r\nHost: x\r\nnonsense\r\n\r\n", *INVALID),
    "head over 128 KB": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 200_000 + b"\r\n\r\n", *INVALID),
    "Content-Length over the limit": (JSON_HEAD + b"Content-Length: " + str(BODY_LIMIT * 100).encode()
                                      + b"\r\n\r\n{}", 413, "body_too_large"),
    "chunked body over the limit": (JSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                                    + b"".join(b"1000\r\n" + b" " * 4096 + b"\r\n" for _ in range(BODY_LIMIT // 4096 + 2))
                                    + b"0\r\n\r\n", 413, "body_too_large"),
    "request line of 100 KB": (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "HTTP/2 preface (no such route)": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 404, "not_found"),
    "HTTP/1.0 without Host": (b"GET /health HTTP/1.0\r\n\r\n", 200, None),
    "two pipelined requests": (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2, 200, None),
}


def _malformed_cases(live: LiveServer) -> list[Outcome]:
    outcomes = []
    for name, (data, status, code) in MALFORMED.items():
        with _connect(live) as sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            sock.settimeout(READ_TIMEOUT + 3)
            reply = _read_all(sock)
        got = _status(reply)
        ok = got == status
        if name == "two pipelined requests":
            ok = reply.count(b"HTTP/1.1 200") == 2
        if code is not None:
            ok = ok and _error_of_raw(reply) == code
        outcomes.append(_outcome(f"raw: {name}", "malformed HTTP", ok, got is None or got >= 500, f"{got}",
                                refused=status >= 400))
    return outcomes


def _raw_outcomes(live: LiveServer) -> list[Outcome]:
    return _slow_cases(live) + _malformed_cases(live)
