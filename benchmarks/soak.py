"""Soak test of `janusvl serve`: minutes of mixed load on loopback, then a table of what happened.

    python benchmarks/soak.py                        # 10 minutes on a tiny random checkpoint
    python benchmarks/soak.py --minutes 1 --concurrency 6
    python benchmarks/soak.py MODEL --minutes 30

Workers drive the server with the official openai client and httpx: chats with images, streamed
chats, image generations, clients that hang up (mid-stream, mid-image, while waiting for a whole
answer) and bad requests (each must get its 4xx). After a warm-up the server's RSS is read at
rest; at the end, at rest again. The table gives requests served, outcomes by kind, p50/p99
latency, RSS at start and end (growth), and the server's running gauge and KV memory at the end.
A greedy probe asked before and after must get the same answer. Linux (RSS from /proc).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import pct, start_server  # noqa: E402

MODEL_NAME = "soak"
QUESTIONS = ["What is in this picture?", "Describe the colours.", "Count the objects.", "Is it day or night?"]
PROBE = [{"role": "user", "content": "Tell me about the sea."}]


@dataclass(frozen=True)
class Record:
    kind: str
    outcome: str  # ok | refused (a bad request's 4xx) | hung up (on purpose) | 4xx | 5xx | error: <type>
    seconds: float


@dataclass
class SoakResult:
    records: list[Record]
    seconds: float
    rss_start: int  # bytes, at rest after the warm-up
    rss_end: int  # bytes, at rest after the load
    running_end: float  # the server's running gauge at the end
    kv_bytes_end: float
    probe_same: bool  # the greedy probe's answer did not change
    exit_code: int | None  # after SIGTERM
    stderr: str = ""

    @property
    def growth(self) -> float:
        return self.rss_end / self.rss_start - 1

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.records)

    @property
    def server_errors(self) -> int:
        return self.count("5xx")

    @property
    def unexpected(self) -> list[Record]:
        return [r for r in self.records if r.outcome not in ("ok", "refused", "hung up")]


# ---------------------------------------------------------------------- the load

def _png(seed: int) -> str:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (64 + 16 * (seed % 3), 48))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(image.width * image.height)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# A few pictures, reused: the feature cache fills during the warm-up and then holds steady.
PICTURES = [_png(seed) for seed in range(6)]


def _png_header(width: int, height: int) -> bytes:
    """The start of a 1-bit PNG claiming width x height pixels: enough for a header check."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


TOO_BIG = "data:image/png;base64," + base64.b64encode(_png_header(13000, 13000)).decode()


def _bad_requests() -> list[tuple[str, dict[str, str], bytes]]:
    """(path, headers, body) of requests that must be refused with a 4xx."""
    def chat(**fields: object) -> bytes:
        return json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()

    json_type = {"content-type": "application/json"}
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": TOO_BIG}}]}]
    return [
        ("/v1/chat/completions", json_type, b'{"messages": [}'),
        ("/v1/chat/completions", {"content-type": "text/plain"}, chat()),
        ("/v1/chat/completions", json_type, chat(temperature="hot")),
        ("/v1/chat/completions", json_type, chat(n=99)),
        ("/v1/chat/completions", json_type, chat(max_tokens=10**9)),
        ("/v1/chat/completions", json_type, chat(messages=[{"role": "user", "content": "\ud800"}])),
        ("/v1/chat/completions", json_type, chat(messages=image)),
        ("/v1/chat/completions", json_type, chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])),
        ("/v1/chat/completions", json_type, chat(model="gpt-4o")),
        ("/v1/images/generations", json_type, json.dumps({"prompt": "x", "size": "1024x1024"}).encode()),
        ("/v1/images/generations", json_type, json.dumps({"prompt": "", "n": 1}).encode()),
    ]


class Load:
    """The actions a worker picks from, each recording its outcome."""

    def __init__(self, url: str, image_steps: bool) -> None:
        self.url = url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        self.images = image_steps  # False: no image generation (a checkpoint too slow for it)
        self.bad = _bad_requests()
        self.records: list[Record] = []
        self.lock = threading.Lock()

    def actions(self) -> list[tuple[Callable[[random.Random], str], int]]:
        table = [(self.chat_with_image, 4), (self.streamed_chat, 4), (self.hang_up_stream, 2),
                 (self.hang_up_waiting, 1), (self.bad_request, 3)]
        if self.images:
            table += [(self.generate_image, 1), (self.hang_up_image, 1)]
        return table

    def run(self, rng: random.Random, deadline: float) -> None:
        actions, weights = zip(*self.actions(), strict=True)
        while time.monotonic() < deadline:
            action = rng.choices(actions, weights)[0]
            start = time.perf_counter()
            try:
                outcome = action(rng)
            except openai.APIStatusError as exc:
                outcome = "5xx" if exc.status_code >= 500 else "4xx"
            except Exception as exc:  # noqa: BLE001 - any other failure is counted, not raised
                outcome = f"error: {type(exc).__name__}"
            with self.lock:
                self.records.append(Record(action.__name__, outcome, time.perf_counter() - start))

    def chat_with_image(self, rng: random.Random) -> str:
        content = [{"type": "image_url", "image_url": {"url": rng.choice(PICTURES)}},
                   {"type": "text", "text": rng.choice(QUESTIONS)}]
        self.client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": content}],
                                            max_tokens=rng.randint(4, 24), temperature=rng.choice([0, 0.8]),
                                            seed=rng.randrange(1000))
        return "ok"

    def streamed_chat(self, rng: random.Random) -> str:
        stream = self.client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": rng.choice(QUESTIONS)}],
            max_tokens=rng.randint(8, 48), temperature=0, stream=True, stream_options={"include_usage": True})
        usage = [c.usage for c in stream if c.usage]
        return "ok" if usage else "error: no usage"

    def generate_image(self, rng: random.Random) -> str:
        result = self.client.images.generate(model=MODEL_NAME, prompt="a lighthouse", n=1,
                                             extra_body={"seed": rng.randrange(1000)})
        return "ok" if result.data and result.data[0].b64_json else "error: no image"

    def hang_up_stream(self, rng: random.Random) -> str:
        content = [{"type": "image_url", "image_url": {"url": rng.choice(PICTURES)}}, {"type": "text", "text": "Go on."}]
        stream = self.client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": content}],
                                                     max_tokens=400, temperature=0, stream=True)
        for i, _ in enumerate(stream):
            if i >= rng.randint(0, 6):
                break
        stream.close()
        return "hung up"

    def hang_up_image(self, rng: random.Random) -> str:
        with httpx.stream("POST", self.url + "/v1/images/generations", timeout=60,
                          json={"prompt": "a storm", "stream": True, "seed": rng.randrange(1000)}) as response:
            if response.status_code != 200:
                return "5xx" if response.status_code >= 500 else "4xx"
            for i, _ in enumerate(response.iter_lines()):
                if i >= rng.randint(1, 8):
                    break
        return "hung up"

    def hang_up_waiting(self, rng: random.Random) -> str:
        try:
            httpx.post(self.url + "/v1/chat/completions", timeout=rng.uniform(0.05, 0.5),
                       json={"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 400, "temperature": 0})
        except httpx.TimeoutException:
            return "hung up"
        return "ok"  # finished before the client gave up

    def bad_request(self, rng: random.Random) -> str:
        path, headers, body = rng.choice(self.bad)
        response = httpx.post(self.url + path, headers=headers, content=body, timeout=60)
        if response.status_code >= 500:
            return "5xx"
        shaped = set(response.json().get("error", {})) == {"message", "type", "param", "code"}
        return "refused" if 400 <= response.status_code < 500 and shaped else f"error: {response.status_code}"


# ---------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    """Resident memory of process `pid` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if not line.startswith("#") and value:
            values[name] = float(value)
    return values


def wait_at_rest(url: str, timeout: float = 120) -> dict[str, float]:
    """The server's metrics once nothing runs or waits (and the engine has let go of its KV memory)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["janusvl_requests_running"] == 0 and m["janusvl_requests_waiting"] == 0
        if (idle and m["janusvl_kv_cache_bytes"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def _probe(url: str) -> str:
    response = httpx.post(url + "/v1/chat/completions", timeout=120,
                          json={"messages": PROBE, "max_tokens": 12, "temperature": 0})
    return response.json()["choices"][0]["message"]["content"]


def _drive(load: Load, seconds: float, concurrency: int, seed: int) -> None:
    deadline = time.monotonic() + seconds
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(load.run, random.Random(seed + i), deadline) for i in range(concurrency)]:
            future.result()


def soak(model: Path, seconds: float, warmup: float = 30, concurrency: int = 4, seed: int = 0,
         image_generation: bool = True, server_args: list[str] | None = None) -> SoakResult:
    """Start `janusvl serve model`, warm it up, load it for `seconds`, and report."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        flags = ["--read-timeout", "10", "--max-body-mb", "4", "--max-image-pixels", "4000000", *(server_args or [])]
        proc = start_server(model, port, flags, MODEL_NAME, log)
        try:
            before = _probe(url)
            _drive(Load(url, image_generation), warmup, concurrency, seed + 1000)
            wait_at_rest(url)
            rss_start = rss(proc.pid)
            load = Load(url, image_generation)
            began = time.monotonic()
            _drive(load, seconds, concurrency, seed)
            elapsed = time.monotonic() - began
            end = wait_at_rest(url)
            rss_end = rss(proc.pid)
            same = _probe(url) == before
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return SoakResult(load.records, elapsed, rss_start, rss_end, end["janusvl_requests_running"],
                          end["janusvl_kv_cache_bytes"], same, code, log.read_text()[-4000:])


# ---------------------------------------------------------------------- the table

def table(result: SoakResult) -> str:
    by_kind: dict[str, list[Record]] = defaultdict(list)
    for r in result.records:
        by_kind[r.kind].append(r)
    outcomes = sorted({r.outcome for r in result.records}, key=lambda o: (o != "ok", o))
    head = f"{'kind':<17}{'requests':>9}" + "".join(f"{o:>10}" for o in outcomes) + f"{'p50 s':>8}{'p99 s':>8}"
    lines = [head, "-" * len(head)]
    for kind, records in sorted(by_kind.items()):
        counts = Counter(r.outcome for r in records)
        times = [r.seconds for r in records if r.outcome in ("ok", "refused")]
        lines.append(f"{kind:<17}{len(records):>9}" + "".join(f"{counts[o]:>10}" for o in outcomes)
                     + f"{pct(times, 50):>8.2f}{pct(times, 99):>8.2f}")
    counts = Counter(r.outcome for r in result.records)
    times = [r.seconds for r in result.records if r.outcome in ("ok", "refused")]
    lines.append(f"{'all':<17}{len(result.records):>9}" + "".join(f"{counts[o]:>10}" for o in outcomes)
                 + f"{pct(times, 50):>8.2f}{pct(times, 99):>8.2f}")
    mb = 2**20
    lines += ["",
              f"{len(result.records)} requests in {result.seconds:.0f} s ({len(result.records) / result.seconds:.1f}/s); "
              f"served {counts['ok']}, refused as expected {counts['refused']}, hung up on purpose {counts['hung up']}, "
              f"5xx {counts['5xx']}, other errors {len(result.unexpected) - counts['5xx']}",
              f"server RSS at rest: {result.rss_start / mb:.0f} MB after warm-up, {result.rss_end / mb:.0f} MB at the "
              f"end ({100 * result.growth:+.1f}%)",
              f"at the end: running gauge {result.running_end:g}, KV cache bytes {result.kv_bytes_end:g}, "
              f"greedy probe unchanged: {result.probe_same}, exit code after SIGTERM: {result.exit_code}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="checkpoint directory (default: a tiny random one)")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=30, help="seconds of load before RSS is first read")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-images", action="store_true", help="leave image generation out of the mix")
    parser.add_argument("--server-args", default="", help="extra `janusvl serve` flags")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else _tiny(Path(tmp))
        result = soak(model, args.minutes * 60, args.warmup, args.concurrency, args.seed, not args.no_images,
                      args.server_args.split())
    print(table(result))
    healthy = not result.unexpected and result.exit_code == 0 and result.probe_same
    return 0 if healthy else 1


def _tiny(tmp: Path) -> Path:
    import torch

    from janusvl.testing.checkpoint import write_checkpoint

    return write_checkpoint(tmp / "tiny", dtype=torch.float32, seed=1)


if __name__ == "__main__":
    raise SystemExit(main())
