"""What the subcommands share: model and sampling options, loading with progress, streaming."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from .. import validation
from ..errors import JanusError
from ..processing.images_io import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImageLimits

if TYPE_CHECKING:
    from ..api import Janus


class CommandError(JanusError):
    """A command-line value that cannot be honoured (e.g. a device this machine does not have)."""


DTYPE_CHOICES = ["auto", "bfloat16", "float16", "float32"]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights dtype; auto keeps the checkpoint's own (default: auto)")
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default=None,
                        help="int8 / int4 store the language model's weights in 8 / 4 bits: faster "
                             "decoding, logits within the README's documented error (default: as the "
                             "checkpoint stores them; a pre-quantised one loads quantised)")


def checked(parse: Callable[[str], Any], check: Callable[[str, Any], Any]) -> Callable[[str], Any]:
    """An argparse type: `parse` the text, then run a `janusvl.validation` check on the value,
    so the command line refuses what the library would (argparse names the flag)."""
    def convert(text: str) -> Any:
        try:
            return check("value", parse(text))
        except (ValueError, JanusError) as exc:
            reason = str(exc).removeprefix("value ") if isinstance(exc, JanusError) else f"got {text!r}"
            raise argparse.ArgumentTypeError(reason) from None
    return convert


def seed_option(text: str) -> int:
    return checked(int, validation.seed)(text)


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """How input images are opened (see janusvl.processing.images_io.ImageLimits)."""
    parser.add_argument("--max-image-pixels", type=checked(int, lambda n, v: validation.integer(n, v, 1)),
                        default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                        help="refuse images with more pixels, checked before decoding "
                             f"(default: {DEFAULT_MAX_IMAGE_PIXELS:,})")
    parser.add_argument("--max-image-bytes", type=checked(int, lambda n, v: validation.integer(n, v, 1)),
                        default=DEFAULT_MAX_IMAGE_BYTES, metavar="N",
                        help=f"refuse image files larger than this (default: {DEFAULT_MAX_IMAGE_BYTES:,})")
    parser.add_argument("--exif-transpose", action="store_true",
                        help="turn photos upright by their EXIF orientation (DeepSeek's pipeline, and the "
                             "default, ignore it)")


def image_limits(args: argparse.Namespace) -> ImageLimits:
    return ImageLimits(args.max_image_pixels, args.max_image_bytes, args.exif_transpose)


def image_load_options(args: argparse.Namespace) -> dict[str, Any]:
    """`Janus.from_pretrained` keywords for the image options."""
    return {"max_image_pixels": args.max_image_pixels, "max_image_bytes": args.max_image_bytes,
            "exif_transpose": args.exif_transpose}


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"most tokens per answer (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 answers greedily; higher samples more freely (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=seed_option, default=None, help="seed for reproducible sampling")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The chat arguments, checked now (by the library's own checks, naming the flags) so a bad
    value fails before the model loads."""
    return {"max_new_tokens": validation.integer("--max-new-tokens", args.max_new_tokens, minimum=1),
            "temperature": validation.temperature("--temperature", args.temperature),
            "top_p": validation.number("--top-p", args.top_p, above=0.0, maximum=1.0),
            "top_k": validation.integer("--top-k", args.top_k, minimum=0),
            "seed": validation.seed("--seed", args.seed)}


def check_device(device: str) -> str:
    """Fail fast, before loading gigabytes, on a device name torch rejects or lacks."""
    if device == "auto":
        return device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CommandError(f"--device {device!r}: not a device name (try cpu, cuda, cuda:1 or mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {device}: MPS is not available on this machine")
    return device


def status(message: str) -> None:
    """Progress and notes go to stderr, so stdout holds only the answer."""
    print(message, file=sys.stderr, flush=True)


def load(model: str, device: str, dtype: str, quantize: str | None = None, **options: Any) -> Janus:
    """Load with a progress note; `options` go to `Janus.from_pretrained` (image limits)."""
    from ..api import Janus

    status(f"Loading {model} ...")
    start = time.perf_counter()
    janus = Janus.from_pretrained(model, device=check_device(device), dtype=dtype, quantize=quantize, **options)
    params = sum(p.numel() for p in janus.model.parameters())
    status(f"Loaded in {time.perf_counter() - start:.1f} s: {params / 1e6:,.0f}M parameters, "
           f"{janus.model.device}, {str(janus.model.dtype).removeprefix('torch.')}")
    return janus


# Escape sequences (CSI, OSC, two-character), then any other C0 / C1 control but tab and newline,
# and the bidirectional overrides that make text read differently from what it holds. ESC itself
# is in the last class, so a sequence split across two chunks is defused too.
_TERMINAL_CONTROLS = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """`text` without what a terminal would act on rather than show (model output may hold
    anything: moving the cursor, retitling the window, rewriting what was printed)."""
    return _TERMINAL_CONTROLS.sub("", text)


def write_stream(chunks: Iterable[str]) -> None:
    """Print text chunks as they come, then end the line. On a terminal, control characters and
    escape sequences are dropped; into a pipe or file the text goes unchanged."""
    clean = sys.stdout.isatty()
    for chunk in chunks:
        sys.stdout.write(terminal_safe(chunk) if clean else chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
