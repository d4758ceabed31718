"""Helpers for the server tests: a real uvicorn server on loopback (in a thread, over an engine
in this process, or as a `janusvl serve` subprocess) and the official openai client."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from PIL import Image

from janusvl.engine import Engine, Metrics
from janusvl.server.app import ServerOptions, ServerState, create_app
from janusvl.server.guard import server_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


class LiveServer:
    """`create_app` over a started engine, served by uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, janus: Any, model_name: str = "tiny", engine_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        import uvicorn

        self.engine = Engine(janus, metrics=Metrics(), **(engine_options or {})).start()
        self.state = ServerState(ready=True)
        self.app = create_app(self.engine, ServerOptions(model_name=model_name, **options), self.state)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = server_config(self.app, "127.0.0.1", self.port, options.get("read_timeout", 30.0),
                               log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def client(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """The value of an unlabelled metric in /metrics."""
        text = httpx.get(self.url + "/metrics", headers=headers).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.engine.idle:
            if time.monotonic() > deadline:
                raise AssertionError("the engine still has work after the requests ended")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close(timeout=0)

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServeProcess:
    """`python -m janusvl serve MODEL` in a subprocess, on a free loopback port."""

    def __init__(self, model: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "janusvl", "serve", str(model), "--port",
                                      str(self.port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"janusvl serve did not start: {self.proc.communicate()[1]}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
