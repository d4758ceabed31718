"""Load benchmark of `janusvl serve`: starts the server on a checkpoint, drives it on loopback
with the official openai client, and prints requests/s, aggregate generated tokens/s and p50/p99
time to first token and latency per scenario and concurrency.

    python benchmarks/serve_load.py                    # tiny random checkpoint (written to a temp dir)
    python benchmarks/serve_load.py --pro-1b           # Janus-Pro-1B-sized random bf16 (~/.cache/janusvl)
    python benchmarks/serve_load.py MODEL --concurrency 1 4 16 --new-tokens 64

Scenarios: `text` (text-only prompts), `image` (an image and a question), `mix` (image chats
with one image generation per four requests), and `pause`: the longest gap between two tokens
of a running stream while another request's image prompt is being prefilled. Needs the `serve`
and `test` extras (the server, and the openai client).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from janusvl.benchmark import test_image  # noqa: E402

QUESTIONS = ["Describe this image in detail.", "What colours do you see?", "Write a short poem about it.",
             "List three objects you might find here.", "Is it day or night, and why?"]


def image_url() -> str:
    buf = io.BytesIO()
    test_image().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(model: Path, port: int, extra: list[str], name: str = "bench",
                 log: Path | None = None) -> subprocess.Popen:
    """`janusvl serve` on 127.0.0.1:`port`, once healthy. Its stderr goes to `log` when given: in
    a long run a pipe nobody reads fills up with warnings and blocks the server."""
    stderr = log.open("w") if log else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-m", "janusvl", "serve", str(model), "--port", str(port),
                             "--served-model-name", name, *extra], stderr=stderr, text=True)
    if log:
        stderr.close()  # the server holds its own copy
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:] if log else proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become healthy in 10 minutes")


def chat_once(client: openai.OpenAI, content: Any, new_tokens: int) -> dict[str, Any]:
    """One streamed chat; times of arrival, first token and end, tokens, and the token stamps."""
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": content}],
                                            max_tokens=new_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        # The server sends one chunk per token (content "" while its text is held back, which
        # random weights do often); the first chunk comes with the first token.
        if chunk.choices and chunk.choices[0].delta.content is not None:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"start": start, "ttft": (stamps[0] if stamps else end) - start, "latency": end - start,
            "tokens": tokens, "stamps": stamps}


def image_once(client: openai.OpenAI) -> dict[str, Any]:
    start = time.perf_counter()
    client.images.generate(model="bench", prompt="a lighthouse on a cliff at sunset", n=1, size="384x384",
                           response_format="b64_json", extra_body={"seed": 0})
    latency = time.perf_counter() - start
    return {"start": start, "ttft": latency, "latency": latency, "tokens": 0, "stamps": []}


def run_level(client: openai.OpenAI, scenario: str, concurrency: int, requests: int, new_tokens: int,
              url: str) -> dict[str, Any]:
    def one(i: int) -> dict[str, Any]:
        question = QUESTIONS[i % len(QUESTIONS)]
        if scenario == "mix" and i % 4 == 3:
            return image_once(client)
        if scenario == "text":
            return chat_once(client, f"Request {i}. {question}", new_tokens)
        return chat_once(client, [{"type": "image_url", "image_url": {"url": url}},
                                  {"type": "text", "text": f"Request {i}. {question}"}], new_tokens)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    chats = [r for r in results if r["stamps"]]
    return {"scenario": scenario, "concurrency": concurrency, "requests": requests, "wall_s": wall,
            "req_per_s": requests / wall, "gen_tok_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": pct([r["ttft"] for r in chats], 50), "ttft_p99": pct([r["ttft"] for r in chats], 99),
            "lat_p50": pct([r["latency"] for r in results], 50), "lat_p99": pct([r["latency"] for r in results], 99)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(int(q), 99) - 1]


def longest_pause(client: openai.OpenAI, url: str, story_tokens: int) -> tuple[float, float]:
    """(longest gap between two tokens of a running text stream while an image request is
    prefilled, the typical gap before it arrived)."""
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(chat_once, client, "Tell me a long story about a lighthouse keeper.", story_tokens)
        time.sleep(1.0)  # the story is decoding
        newcomer = pool.submit(chat_once, client, [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": QUESTIONS[0]}], 8)
        story, new = running.result(), newcomer.result()
    arrived, first = new["start"], new["start"] + new["ttft"]
    stamps = story["stamps"]
    gaps_during = [b - a for a, b in zip(stamps, stamps[1:]) if b > arrived and a < first]
    gaps_before = [b - a for a, b in zip(stamps, stamps[1:]) if b <= arrived]
    return max(gaps_during, default=float("nan")), statistics.median(gaps_before) if gaps_before else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="checkpoint directory (default: a tiny random one)")
    parser.add_argument("--pro-1b", action="store_true", help="use the bench's Janus-Pro-1B-sized random checkpoint")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--scenarios", nargs="+", default=["text", "image", "mix", "pause"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pause-tokens", type=int, default=300,
                        help="length of the running story in the pause scenario (it must outlast the prefill)")
    parser.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency")
    parser.add_argument("--server-args", default="", help="extra `janusvl serve` flags, e.g. '--quantize int8'")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = Path(args.model)
        elif args.pro_1b:
            from janusvl.benchmark import default_checkpoint

            model = default_checkpoint()
        else:
            import torch

            from janusvl.testing.checkpoint import write_checkpoint

            model = write_checkpoint(Path(tmp) / "tiny", dtype=torch.float32, seed=1)
        port = 8700 + os.getpid() % 1000
        server = start_server(model, port, args.server_args.split() + ["--max-batch", str(max(args.concurrency))])
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=3600)
            url = image_url()
            chat_once(client, "warm up", 4)
            rows = []
            for scenario in (s for s in args.scenarios if s != "pause"):
                for c in args.concurrency:
                    rows.append(run_level(client, scenario, c, args.waves * c, args.new_tokens, url))
                    print_row(rows[-1], header=len(rows) == 1)
            by = {(r["scenario"], r["concurrency"]): r for r in rows}
            if ("text", 1) in by and ("text", 8) in by:
                ratio = by[("text", 8)]["gen_tok_per_s"] / by[("text", 1)]["gen_tok_per_s"]
                print(f"\ntext, aggregate generated tokens/s at concurrency 8 / concurrency 1: {ratio:.2f}x")
            if "pause" in args.scenarios:
                worst, typical = longest_pause(client, url, args.pause_tokens)
                print(f"longest pause between two tokens of a running stream while an image prompt is "
                      f"prefilled: {worst:.2f} s (typical gap before: {typical:.3f} s)")
        finally:
            server.terminate()
            server.wait(120)
    return 0


def print_row(r: dict[str, Any], header: bool) -> None:
    if header:
        print(f"{'scenario':<9}{'conc':>5}{'reqs':>6}{'req/s':>8}{'gen tok/s':>11}{'ttft p50':>10}"
              f"{'ttft p99':>10}{'lat p50':>9}{'lat p99':>9}   (seconds)")
    print(f"{r['scenario']:<9}{r['concurrency']:>5}{r['requests']:>6}{r['req_per_s']:>8.2f}{r['gen_tok_per_s']:>11.1f}"
          f"{r['ttft_p50']:>10.2f}{r['ttft_p99']:>10.2f}{r['lat_p50']:>9.2f}{r['lat_p99']:>9.2f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
