"""What the subcommands share: model and sampling options, loading with progress, streaming."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..errors import JanusError
from ..generation.sampling import SamplingParams

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
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                        help="int8 / int4 store the language model's weights in 8 / 4 bits: faster "
                             "decoding, logits within the README's documented error (default: none)")


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"most tokens per answer (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 answers greedily; higher samples more freely (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The chat arguments, checked now so a bad value fails before the model loads."""
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}


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


def load(model: str, device: str, dtype: str, quantize: str = "none") -> Janus:
    from ..api import Janus

    status(f"Loading {model} ...")
    start = time.perf_counter()
    janus = Janus.from_pretrained(model, device=check_device(device), dtype=dtype, quantize=quantize)
    params = sum(p.numel() for p in janus.model.parameters())
    status(f"Loaded in {time.perf_counter() - start:.1f} s: {params / 1e6:,.0f}M parameters, "
           f"{janus.model.device}, {str(janus.model.dtype).removeprefix('torch.')}")
    return janus


def write_stream(chunks: Iterable[str]) -> None:
    """Print text chunks as they come, then end the line."""
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
