"""`janusvl chat MODEL [--image PATH]... [PROMPT]`: one streamed answer, or a conversation."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

from PIL import Image

from ..errors import JanusError
from ..processing import open_image
from .common import (add_image_options, add_model_options, add_sampling_options, check_device, image_limits,
                     image_load_options, load, sampling_kwargs, status, write_stream)

if TYPE_CHECKING:
    from ..api import Janus

SESSION_HELP = """\
interactive session (no PROMPT given): each line you type is a message; the answer streams to
stdout. Lines may also come from a pipe. Commands:
  /image PATH   attach an image to your next message (repeat for several)
  /reset        forget the conversation so far
  /quit         leave (end of input works too)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat", help="ask a Janus model about images (one-shot or interactive)",
        description="Ask a Janus model about images. With PROMPT, stream one answer and exit; "
                    "without, hold a multi-turn conversation read from stdin.",
        epilog=SESSION_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL",
                        help="checkpoint directory or Hub id (e.g. deepseek-ai/Janus-Pro-1B)")
    parser.add_argument("prompt", metavar="PROMPT", nargs="?",
                        help="the question; omit for an interactive session")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="image for the (first) message; repeat for several")
    parser.add_argument("--system", default=None, help="replace the default system prompt")
    add_sampling_options(parser, max_new_tokens=512)
    add_image_options(parser)
    add_model_options(parser)
    parser.set_defaults(run=run)


def user_message(text: str, images: list[Image.Image]) -> dict[str, Any]:
    parts = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def run(args: argparse.Namespace) -> int:
    # Every argument is checked before the slow model load.
    check_device(args.device)
    sampling = sampling_kwargs(args)
    images = [open_image(path, image_limits(args)) for path in args.image]
    janus = load(args.model, args.device, args.dtype, args.quantize, **image_load_options(args))
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    if args.prompt is not None:
        messages = [*system, user_message(args.prompt, images)]
        write_stream(janus.chat(messages, stream=True, **sampling))
        return 0
    return Session(janus, system, images, sampling).run(sys.stdin)


class Session:
    """A multi-turn conversation over lines of input; returns 1 if any turn failed."""

    def __init__(self, janus: Janus, system: list[dict[str, Any]], images: list[Image.Image],
                 sampling: dict[str, Any]) -> None:
        self.janus = janus
        self.system = system
        self.sampling = sampling
        self.history: list[dict[str, Any]] = []
        self.pending = images  # attached to the next message
        self.failed = False

    def run(self, stdin: TextIO) -> int:
        if stdin.isatty():
            status("Type a message; /image PATH attaches an image, /reset starts over, /quit leaves.")
        for line in _lines(stdin):
            if line.startswith("/"):
                if not self.command(line):
                    break
            elif line.strip():
                self.turn(line)
        return 1 if self.failed else 0

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        name, _, arg = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.history, self.pending = [], []
            status("(conversation cleared)")
        elif name == "/image" and arg.strip():
            try:
                self.pending.append(open_image(arg.strip(), self.janus.processor.image_limits))
                status(f"(image {arg.strip()} attached to your next message)")
            except JanusError as exc:
                self.error(exc)
        else:
            self.error(f"unknown command {line!r}; use /image PATH, /reset or /quit")
        return True

    def turn(self, text: str) -> None:
        message = user_message(text, self.pending)
        try:
            stream = self.janus.chat([*self.system, *self.history, message], stream=True, **self.sampling)
            write_stream(stream)
        except JanusError as exc:
            self.error(exc)
            return
        self.history += [message, {"role": "assistant", "content": stream.result.text}]
        self.pending = []

    def error(self, problem: object) -> None:
        print(f"janusvl chat: error: {problem}", file=sys.stderr, flush=True)
        self.failed = True


def _lines(stdin: TextIO) -> Iterator[str]:
    tty = stdin.isatty()
    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = stdin.readline()
        if not line:
            return
        yield line.rstrip("\r\n")
