"""`janusvl demo [MODEL]`: describe a generated picture, end to end.

Without MODEL it needs no download: a tiny checkpoint with random weights is written to a
temporary directory, which shows the whole pipeline working (and answers gibberish)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..testing.checkpoint import write_checkpoint
from .common import (add_model_options, add_sampling_options, check_device, load, sampling_kwargs,
                     status, write_stream)

DEFAULT_PROMPT = "Describe this image."


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="describe a generated test picture (no MODEL: tiny random weights, no download)",
        description="Describe a generated test picture: a house under a sun. Without MODEL, a tiny "
                    "checkpoint with random weights is written to a temporary directory, so the "
                    "answer is gibberish but every stage of the pipeline runs.")
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="checkpoint directory or Hub id (e.g. deepseek-ai/Janus-Pro-1B)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help=f"the question (default: {DEFAULT_PROMPT!r})")
    add_sampling_options(parser, max_new_tokens=128)
    add_model_options(parser)
    parser.set_defaults(run=run)


def demo_image(width: int = 384, height: int = 256) -> Image.Image:
    """A simple scene a real model can name: sky, grass, a red-roofed house, a yellow sun."""
    image = Image.new("RGB", (width, height), (135, 195, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, height * 2 // 3, width, height], fill=(70, 160, 60))
    draw.ellipse([width - 90, 20, width - 30, 80], fill=(250, 210, 40))
    left, top, right = width // 4, height // 3 + 20, width // 4 + 120
    draw.rectangle([left, top, right, height * 2 // 3 + 10], fill=(235, 225, 200))
    draw.polygon([(left - 15, top), ((left + right) // 2, top - 55), (right + 15, top)], fill=(190, 40, 40))
    draw.rectangle([left + 48, top + 50, left + 72, height * 2 // 3 + 10], fill=(110, 70, 40))
    return image


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    sampling_kwargs(args)  # check before writing or loading anything
    if args.model is not None:
        return answer(args, args.model)
    with tempfile.TemporaryDirectory(prefix="janusvl-demo-") as tmp:
        path = Path(tmp) / "tiny-random"
        status(f"No MODEL given: writing a tiny checkpoint with RANDOM weights to {path}.")
        status("Its answer is gibberish; it shows the pipeline running end to end. For real "
               "answers: janusvl demo deepseek-ai/Janus-Pro-1B")
        # float32 because the random model runs on the CPU, where bfloat16 is slower.
        write_checkpoint(path, dtype=torch.float32)
        return answer(args, str(path))


def answer(args: argparse.Namespace, model: str) -> int:
    janus = load(model, args.device, args.dtype, args.quantize)
    status("Image: a generated 384x256 picture (a red-roofed house, grass, a yellow sun). "
           f"Prompt: {args.prompt!r}")
    message = {"role": "user", "content": [{"type": "image", "image": demo_image()},
                                           {"type": "text", "text": args.prompt}]}
    write_stream(janus.chat([message], stream=True, **sampling_kwargs(args)))
    return 0
