"""`janusvl serve MODEL`: the OpenAI-compatible server (needs `pip install "janusvl[serve]"`).

The model is loaded, and the engine started, before the port opens. SIGTERM (or Ctrl-C) starts
a drain: /health turns 503, new requests get 503, running ones may finish for up to
--drain-timeout seconds, then the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from .common import CommandError, add_model_options, load, status


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the model over HTTP with OpenAI's API (chat and image generation)",
        description="Serve MODEL over HTTP: /v1/chat/completions, /v1/images/generations, /v1/models, "
                    "/health and /metrics. Requests are decoded together (continuous batching).")
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    add_model_options(parser)
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: MODEL's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="chat rows decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for room before new ones get 429 (default: 64)")
    parser.add_argument("--max-body-mb", type=float, default=20, help="largest request body (default: 20)")
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000,
                        help="largest image (width x height, read from its header before decoding; "
                             "default: 40000000)")
    parser.add_argument("--read-timeout", type=float, default=30,
                        help="seconds a client has to send a request's headers, and then its body "
                             "(default: 30); slower clients get 408")
    parser.add_argument("--api-key", default=os.environ.get("JANUSVL_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $JANUSVL_API_KEY; none)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser requests from ORIGIN (repeatable; default: none)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs from public addresses (default: data: URLs only)")
    parser.add_argument("--allow-special-tokens", action="store_true",
                        help="read special-token strings in request text (<|Assistant|>, the EOS string, "
                             "<image_placeholder>) as control tokens, as DeepSeek's pipeline does "
                             "(default: ordinary text, so a user cannot end or forge a turn)")
    parser.add_argument("--image-cache-mb", type=float, default=256,
                        help="memory for cached image features (default: 256)")
    parser.add_argument("--prefix-cache-mb", type=float, default=256,
                        help="memory for the keys and values of prompt prefixes reused by later prompts "
                             "that start the same way, e.g. the system prompt (default: 256; 0 turns it off)")
    parser.add_argument("--drain-timeout", type=float, default=30,
                        help="seconds running requests may take to finish after SIGTERM (default: 30)")
    parser.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    for name in ("max_batch", "max_queue", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_body_mb", "drain_timeout", "image_cache_mb", "prefix_cache_mb"):
        if not getattr(args, name) >= 0:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.read_timeout > 0:
        raise CommandError(f"--read-timeout must be > 0, got {args.read_timeout}")
    if not 0 <= args.port < 65536:
        raise CommandError(f"--port must be in 0..65535, got {args.port}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:
        from ..engine import Engine, Metrics
        from ..server.app import ServerOptions, ServerState, create_app
        from ..server.guard import server_config
    except ImportError as exc:
        raise CommandError(f"serving needs the serve extra ({exc.name} is missing): "
                           f"pip install 'janusvl[serve]'") from None
    janus = load(args.model, args.device, args.dtype, args.quantize, max_image_pixels=args.max_image_pixels)
    engine = Engine(janus, max_batch=args.max_batch, max_queue=args.max_queue,
                    image_cache_mb=args.image_cache_mb, prefix_cache_mb=args.prefix_cache_mb,
                    metrics=Metrics()).start()
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name
    state = ServerState(ready=True)
    options = ServerOptions(model_name=name, api_key=args.api_key, cors_origins=args.cors_origin,
                            allow_remote_images=args.allow_remote_images,
                            allow_special_tokens=args.allow_special_tokens,
                            max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                            read_timeout=args.read_timeout)
    app = create_app(engine, options, state)
    config = server_config(app, args.host, args.port, args.read_timeout, log_level="warning",
                           timeout_graceful_shutdown=5)
    server = draining_server(config, engine, state, args.drain_timeout)
    status(f"Serving {name!r} on http://{args.host}:{server.config.port} (OpenAI API under /v1)")
    server.run()
    engine.close(timeout=0)
    return 0


def draining_server(config: Any, engine: Any, state: Any, drain_timeout: float) -> Any:
    """uvicorn's server, where the first SIGTERM/SIGINT drains the engine before exiting."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Not recorded in uvicorn's captured signals: after a drain the process exits 0.
            if self.draining:  # a second signal: stop now
                self.force_exit = self.should_exit = True
                return
            self.draining = state.draining = True
            status("Draining: no new requests; waiting for running ones to finish ...")
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self) -> None:
            if not engine.close(timeout=drain_timeout):
                status(f"Drain timeout ({drain_timeout:g} s): stopped the requests still running")
            self.should_exit = True

    return DrainingServer(config)
