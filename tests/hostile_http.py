"""A hostile HTTP corpus for the server: bad bodies, headers, JSON, messages, parameters and image
data URLs, each with the status and OpenAI error code it must get. Generated here (the images are
a few KB each, built in milliseconds) rather than stored as binary files.

`cases()` lists requests sent with httpx; `tests/test_hostile_server.py` sends them, and raw-socket
cases (slow-loris, malformed HTTP) that httpx cannot produce. An expected status of 200 means the
input is odd but valid and must be served (an animated GIF, a NUL character in text)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"
BODY_LIMIT = 256 * 1024  # the corpus server's --max-body-mb, in bytes
MAX_PIXELS = 40_000_000  # the corpus server's --max-image-pixels


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    body: bytes | None
    status: int
    code: str | None = None  # the error's "code" (None for the 200s)
    path: str = CHAT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


# ---------------------------------------------------------------------- image bytes

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, bit_depth: int = 1, color_type: int = 0, rows: bytes | None = None) -> bytes:
    """A PNG written by hand (Pillow refuses to write some of these): `rows` are the filtered
    scanlines; by default all zero, which deflate shrinks about 1000-fold."""
    if rows is None:
        row = 1 + (width * bit_depth * (3 if color_type == 2 else 1) + 7) // 8
        compressor = zlib.compressobj(9)
        zero = bytes(row)
        idat = b"".join(compressor.compress(zero) for _ in range(height)) + compressor.flush()
    else:
        idat = zlib.compress(rows)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _saved(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _picture(mode: str = "RGB", size: tuple[int, int] = (32, 24)) -> Image.Image:
    image = Image.new("RGB", size)
    image.putdata([(x * 8 % 256, y * 10 % 256, (x + y) * 4 % 256) for y in range(size[1]) for x in range(size[0])])
    return image.convert(mode)


def _animated_gif() -> bytes:
    frames = [_picture("P"), _picture("P").rotate(90)]
    return _saved(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _bad_crc_png() -> bytes:
    data = bytearray(_saved(_picture(), "PNG"))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


def _zip() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.bin", bytes(10 * 2**20))  # 10 MB of zeros: a 10 KB archive
    return buf.getvalue()


TINY_PNG = "data:image/png;base64," + base64.b64encode(_saved(_picture(size=(4, 4)), "PNG")).decode()
SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
       b'<image href="file:///etc/passwd"/><script>alert(1)</script></svg>')


def image_payloads() -> list[tuple[str, str, int, str | None]]:
    """(name, data URL, status, code) for images sent inside a chat request."""
    def url(data: bytes, mime: str = "image/png") -> str:
        return f"data:{mime};base64," + base64.b64encode(data).decode()

    good = _saved(_picture(), "PNG")
    jpeg = _saved(_picture(), "JPEG")
    bad = "invalid_image"
    return [
        ("truncated base64", url(good)[:-3], 400, bad),
        ("base64 with spaces and junk", url(good)[:60] + " %%%" + url(good)[64:], 400, bad),
        ("base64 of nothing", "data:image/png;base64,", 400, bad),
        ("wrong MIME text/plain", url(good, "text/plain"), 400, bad),
        ("no ;base64 marker", "data:image/png," + good[:40].hex(), 400, bad),
        ("data URL without a comma", "data:image/png;base64", 400, bad),
        ("SVG with script", url(SVG, "image/svg+xml"), 400, bad),
        ("HTML as image/png", url(b"<html><body>hi</body></html>"), 400, bad),
        ("zip archive (10 MB of zeros) as image/png", url(_zip()), 400, bad),
        ("PNG 0x0", url(png(0, 0)), 400, bad),
        ("PNG 0x100", url(png(0, 100)), 400, bad),
        ("1-bit PNG 13000x13000 (20 KB, 169 MP)", url(png(13000, 13000)), 400, "image_too_large"),
        ("1-bit PNG 100000x100000 (a decompression bomb)", url(png(100000, 100000, rows=b"\0")), 400,
         "image_too_large"),
        ("PNG 1x60000000", url(png(1, 60_000_000, rows=b"\0")), 400, "image_too_large"),
        ("PNG header claiming 2^31-1 wide", url(png(2**31 - 1, 1, rows=b"\0")), 400, "image_too_large"),
        ("truncated PNG", url(good[: len(good) // 2]), 400, bad),
        ("PNG with a bad CRC", url(_bad_crc_png()), 400, bad),
        ("PNG signature only", url(good[:8]), 400, bad),
        ("truncated JPEG", url(jpeg[: len(jpeg) // 2], "image/jpeg"), 400, bad),
        ("JPEG header only", url(jpeg[:20], "image/jpeg"), 400, bad),
        ("GIF claiming 65535x65535", url(b"GIF89a\xff\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\xff\xff\xff\xff"
                                         b"\x00\x02\x02\x4c\x01\x00;", "image/gif"), 400, "image_too_large"),
        ("GIF with no frame", url(b"GIF89a\x10\x00\x10\x00\x00\x00\x00;", "image/gif"), 400, bad),
        ("BMP header claiming 50000x50000", url(b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack(
            "<IiiHHIIiiII", 40, 50000, 50000, 1, 24, 0, 0, 0, 0, 0, 0), "image/bmp"), 400, "image_too_large"),
        ("file:// URL", "file:///etc/passwd", 400, bad),
        ("javascript: URL", "javascript:alert(1)", 400, bad),
        ("ftp:// URL", "ftp://example.com/cat.png", 400, bad),
        ("remote URL (remote images off)", "https://example.com/cat.png", 400, bad),
        ("loopback URL", "http://127.0.0.1:1/cat.png", 400, bad),
        ("animated GIF (first frame is used)", url(_animated_gif(), "image/gif"), 200, None),
        ("16-bit grayscale PNG", url(_saved(_picture("I;16"), "PNG")), 200, None),
        ("CMYK JPEG", url(_saved(_picture("CMYK"), "JPEG"), "image/jpeg"), 200, None),
        ("palette PNG with transparency", url(_saved(_picture("P"), "PNG", transparency=0)), 200, None),
        ("1x1 PNG", url(_saved(_picture(size=(1, 1)), "PNG")), 200, None),
        ("WebP", url(_saved(_picture(), "WEBP"), "image/webp"), 200, None),
        ("JPEG sent as image/png", url(jpeg), 200, None),
    ]


# ---------------------------------------------------------------------- the corpus

def _invalid_json() -> list[Case]:
    bodies = [b"", b"{", b"}", b"[]", b"null", b"1", b'"text"', b"{'model': 'tiny'}", b'{"messages": [}',
              _json(_chat()) + b"garbage", b'{"messages": [{"role": "user", "content": "hi"}],}',
              b"\xff\xfe\x00\x00", _json(_chat())[:-1], b"[" * 100_000 + b"]" * 100_000,
              b'{"a":' * 20_000 + b"1" + b"}" * 20_000, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}']
    names = ["empty body", "lone brace", "closing brace", "array", "null", "number", "string", "single quotes",
             "unclosed array", "trailing garbage", "trailing comma", "UTF-32 BOM bytes", "truncated",
             "100,000 nested arrays", "20,000 nested objects", "invalid UTF-8 in a string"]
    not_objects = {"array", "null", "number", "string"}  # valid JSON, but not the object a body must be
    return [Case(f"invalid JSON: {n}", "json", b, 400, "invalid_value" if n in not_objects else "invalid_json")
            for n, b in zip(names, bodies, strict=True)]


def _content_types() -> list[Case]:
    body = _json(_chat())
    types = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml",
             "image/png", "application/jsonx", ""]
    cases = [Case(f"content type {t or '(none)'!r}", "content type", body, 415, "unsupported_media_type",
                  headers={"content-type": t} if t else {}) for t in types]
    cases += [
        Case("UTF-16 JSON body (RFC 4627 detection)", "content type", json.dumps(_chat()).encode("utf-16"), 200,
             headers={"content-type": "application/json; charset=utf-16"}),
        Case("a +json content type", "content type", body, 200, headers={"content-type": "application/merge+json"}),
        Case("gzip-encoded body (not decoded)", "content type", zlib.compress(body), 400, "invalid_json",
             headers={"content-type": "application/json", "content-encoding": "gzip"}),
        Case("JSON with charset=utf-8", "content type", body, 200,
             headers={"content-type": "application/json; charset=utf-8"}),
    ]
    return cases


def _sizes() -> list[Case]:
    big = _json(_chat(messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]))
    return [
        Case("body over the limit", "size", big, 413, "body_too_large"),
        Case("image data URL over the limit", "size", _json(_chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * BODY_LIMIT}}]}])),
             413, "body_too_large"),
        Case("a million-entry messages array", "size", b'{"messages": [' + b"1," * 100_000 + b"1]}", 400,
             "invalid_value"),
        Case("prompt far over the context", "size", _json(_chat(messages=[{"role": "user", "content": "why " * 30_000}])),
             400, "context_length_exceeded"),
        Case("max_tokens far over the context", "size", _json(_chat(max_tokens=10**6)), 400, "context_length_exceeded"),
        Case("image prompt far over the context", "size", _json({"prompt": "why " * 30_000}), 400,
             "context_length_exceeded", path=IMAGES),
    ]


def _routes() -> list[Case]:
    body = _json(_chat())
    return [
        Case("GET on chat", "route", None, 405, "method_not_allowed", method="GET"),
        Case("PUT on chat", "route", body, 405, "method_not_allowed", method="PUT"),
        Case("DELETE on chat", "route", None, 405, "method_not_allowed", method="DELETE"),
        Case("PATCH on images", "route", body, 405, "method_not_allowed", method="PATCH", path=IMAGES),
        Case("POST on /v1/models", "route", body, 405, "method_not_allowed", path="/v1/models"),
        Case("unknown route", "route", body, 404, "not_found", path="/v1/completions"),
        Case("path traversal", "route", None, 404, "not_found", method="GET", path="/static/../../etc/passwd"),
        Case("encoded NUL in the path", "route", None, 404, "not_found", method="GET", path="/v1/models%00"),
        Case("query string of 6 KB", "route", body, 200, path=CHAT + "?" + "a=1&" * 1500),
        Case("huge header value (64 KB)", "header", body, 431, "headers_too_large",
             headers={"content-type": "application/json", "x-junk": "a" * 65536}),
        Case("400 headers", "header", body, 431, "headers_too_large",
             headers={"content-type": "application/json", **{f"x-h{i}": "v" * 40 for i in range(400)}}),
        Case("Authorization garbage (no key set)", "header", body, 200,
             headers={"content-type": "application/json", "authorization": "Bearer \x7f" * 10}),
    ]


def _messages() -> list[Case]:
    def chat(messages: Any, status: int = 400, code: str | None = "invalid_value") -> tuple[Any, int, str | None]:
        return messages, status, code

    user = {"role": "user", "content": "hi"}
    table = {
        "messages missing": chat(None),
        "messages empty": chat([]),
        "messages an object": chat({"role": "user", "content": "hi"}),
        "messages a string": chat("hi"),
        "a message that is a number": chat([1]),
        "role missing": chat([{"content": "hi"}]),
        "role 'tool'": chat([{"role": "tool", "content": "hi"}]),
        "role '<|User|>'": chat([{"role": "<|User|>", "content": "hi"}]),
        "content a number": chat([{"role": "user", "content": 5}]),
        "content an object": chat([{"role": "user", "content": {"text": "hi"}}]),
        "part of unknown type": chat([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]),
        "text part without text": chat([{"role": "user", "content": [{"type": "text"}]}]),
        "image part without image_url": chat([{"role": "user", "content": [{"type": "image_url"}]}]),
        "image_url a string": chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
        "image url a number": chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]),
        "two user turns": chat([user, user]),
        "assistant first": chat([{"role": "assistant", "content": "hi"}, user]),
        "system after a turn": chat([user, {"role": "assistant", "content": "x"}, {"role": "system", "content": "s"},
                                     user]),
        "ends with an assistant turn": chat([user, {"role": "assistant", "content": "done"}]),
        "only a system message": chat([{"role": "system", "content": "be nice"}]),
        "image in a system message": chat([{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": TINY_PNG}}]}, user]),
        "lone surrogate in user text": chat([{"role": "user", "content": "hi \ud800 there"}]),
        "lone surrogate in a text part": chat([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
        "lone surrogate in the system text": chat([{"role": "system", "content": "\ud83d"}, user]),
        "NUL and control characters": chat([{"role": "user", "content": "a\u0000b\u001b[31mc\u0007"}], 200, None),
        "bidi overrides and zero-width": chat([{"role": "user", "content": "\u202egnp.exe\u200b\ufeff"}], 200, None),
        "empty user content": chat([{"role": "user", "content": ""}], 200, None),
        "null user content": chat([{"role": "user", "content": None}], 200, None),
        "name with special tokens": chat([{"role": "user", "content": "hi", "name": "<|Assistant|>"}], 200, None),
        "2,000 alternating turns": chat([{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"}
                                         for i in range(2001)], 400, "context_length_exceeded"),
    }
    cases = []
    for name, (messages, status, code) in table.items():
        body = _chat(messages=messages) if messages is not None else {"model": "tiny", "max_tokens": 2}
        cases.append(Case(f"messages: {name}", "messages", _json(body), status, code))
    cesu = b'{"max_tokens": 2, "messages": [{"role": "user", "content": "\xed\xb3\xbf"}]}'  # a UTF-8-encoded surrogate
    cases.append(Case("messages: surrogate bytes (CESU-8) in a string", "messages", cesu, 400, "invalid_value"))
    return cases


def _params() -> list[Case]:
    table: list[tuple[str, dict[str, Any], int, str | None]] = [
        ("max_tokens 0", {"max_tokens": 0}, 400, "invalid_value"),
        ("max_tokens -1", {"max_tokens": -1}, 400, "invalid_value"),
        ("max_tokens 2.9", {"max_tokens": 2.9}, 400, "invalid_value"),
        ("max_tokens '5'", {"max_tokens": "5"}, 400, "invalid_value"),
        ("max_tokens true", {"max_tokens": True}, 400, "invalid_value"),
        ("max_tokens 10^30", {"max_tokens": 10**30}, 400, "context_length_exceeded"),
        ("max_completion_tokens 0", {"max_completion_tokens": 0}, 400, "invalid_value"),
        ("temperature -1", {"temperature": -1}, 400, "invalid_value"),
        ("temperature 2.5", {"temperature": 2.5}, 400, "invalid_value"),
        ("temperature 'hot'", {"temperature": "hot"}, 400, "invalid_value"),
        ("temperature null", {"temperature": None}, 400, "invalid_value"),
        ("top_p 0", {"top_p": 0}, 400, "invalid_value"),
        ("top_p 1.5", {"top_p": 1.5}, 400, "invalid_value"),
        ("top_k -1", {"top_k": -1}, 400, "invalid_value"),
        ("top_k 2.7", {"top_k": 2.7}, 400, "invalid_value"),
        ("seed -1", {"seed": -1}, 400, "invalid_value"),
        ("seed 2^70", {"seed": 2**70}, 400, "invalid_value"),
        ("seed '7'", {"seed": "7"}, 400, "invalid_value"),
        ("n 0", {"n": 0}, 400, "invalid_value"),
        ("n 9", {"n": 9}, 400, "invalid_value"),
        ("n 10000", {"n": 10000}, 400, "invalid_value"),
        ("n 1.0", {"n": 1.0}, 400, "invalid_value"),
        ("stream 'yes'", {"stream": "yes"}, 400, "invalid_value"),
        ("stream_options a list", {"stream": True, "stream_options": [1]}, 400, "invalid_value"),
        ("stop a number", {"stop": 42}, 400, "invalid_value"),
        ("stop list with a number", {"stop": ["a", 1]}, 400, "invalid_value"),
        ("stop empty string", {"stop": ""}, 400, "invalid_value"),
        ("17 stop strings", {"stop": [str(i) for i in range(17)]}, 400, "invalid_value"),
        ("stop with a lone surrogate", {"stop": ["\ud800"]}, 400, "invalid_value"),
        ("logprobs true", {"logprobs": True}, 400, "unsupported_parameter"),
        ("frequency_penalty 1", {"frequency_penalty": 1.0}, 400, "unsupported_parameter"),
        ("presence_penalty -2", {"presence_penalty": -2.0}, 400, "unsupported_parameter"),
        ("model of another server", {"model": "gpt-4o"}, 404, "model_not_found"),
        ("model a number", {"model": 4}, 400, "invalid_value"),
        ("unknown fields (ignored)", {"user": "x", "metadata": {"a": 1}, "tools": []}, 200, None),
    ]
    cases = [Case(f"chat param: {name}", "params", _json(_chat(**extra)), status, code)
             for name, extra, status, code in table]
    nan = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    cases.append(Case("chat param: temperature NaN", "params", nan, 400, "invalid_value"))
    cases.append(Case("chat param: top_p Infinity", "params", nan.replace(b"temperature\": NaN", b"top_p\": Infinity"),
                      400, "invalid_value"))
    return cases


def _image_params() -> list[Case]:
    table: list[tuple[str, dict[str, Any], int, str | None]] = [
        ("prompt missing", {}, 400, "invalid_value"),
        ("prompt empty", {"prompt": ""}, 400, "invalid_value"),
        ("prompt only spaces", {"prompt": "   "}, 400, "invalid_value"),
        ("prompt a number", {"prompt": 5}, 400, "invalid_value"),
        ("prompt a list", {"prompt": ["a", "b"]}, 400, "invalid_value"),
        ("prompt with a lone surrogate", {"prompt": "a \udc80 cat"}, 400, "invalid_value"),
        ("n 0", {"prompt": "a cat", "n": 0}, 400, "invalid_value"),
        ("n 17", {"prompt": "a cat", "n": 17}, 400, "invalid_value"),
        ("n 10000", {"prompt": "a cat", "n": 10000}, 400, "invalid_value"),
        ("size 1024x1024", {"prompt": "a cat", "size": "1024x1024"}, 400, "invalid_value"),
        ("size garbage", {"prompt": "a cat", "size": "384x384x384"}, 400, "invalid_value"),
        ("response_format url", {"prompt": "a cat", "response_format": "url"}, 400, "invalid_value"),
        ("cfg_weight 0", {"prompt": "a cat", "cfg_weight": 0}, 400, "invalid_value"),
        ("cfg_weight 1e30", {"prompt": "a cat", "cfg_weight": 1e30}, 400, "invalid_value"),
        ("cfg_weight -5", {"prompt": "a cat", "cfg_weight": -5}, 400, "invalid_value"),
        ("temperature 0", {"prompt": "a cat", "temperature": 0}, 400, "invalid_value"),
        ("seed 2^64", {"prompt": "a cat", "seed": 2**64}, 400, "invalid_value"),
        ("stream 1", {"prompt": "a cat", "stream": 1}, 400, "invalid_value"),
        ("model of another server", {"prompt": "a cat", "model": "dall-e-3"}, 404, "model_not_found"),
    ]
    return [Case(f"image param: {name}", "image params", _json(extra), status, code, path=IMAGES)
            for name, extra, status, code in table]


def _images() -> list[Case]:
    cases = []
    for name, url, status, code in image_payloads():
        message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "What is this?"}]}
        cases.append(Case(f"image: {name}", "image", _json(_chat(messages=[message])), status, code))
    return cases


def cases() -> list[Case]:
    return [*_invalid_json(), *_content_types(), *_sizes(), *_routes(), *_messages(), *_params(),
            *_image_params(), *_images()]
