"""`janusvl bench [MODEL]`: speed and memory beside transformers' Janus and this machine's bounds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure load, latency, decode and image speed, and memory",
        description="Measure janusvl on one 640x480 image + question and on a batch of 8, and image "
                    "generation (n=1, n=4); run transformers' Janus on the same checkpoint in the same "
                    "run when it is installed; print each figure beside this machine's bound. With no "
                    "MODEL, Janus-Pro-1B-sized random bf16 checkpoints (safetensors and pytorch_model.bin, "
                    "4.2 GB each) are written once to the user cache, and load is measured from both.")
    parser.add_argument("model", nargs="?", help="checkpoint directory or Hub id (default: random Pro-1B shape)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per measurement (default: 32)")
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default=None,
                        help="janusvl's decoder weights (default: as the checkpoint stores them)")
    parser.add_argument("--no-images", action="store_true", help="skip image generation (the slowest part)")
    parser.add_argument("--no-transformers", action="store_true", help="measure janusvl only")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import benchmark

    report = benchmark.run(args.model, threads=args.threads, new_tokens=args.new_tokens,
                           images=not args.no_images, transformers=not args.no_transformers,
                           quantize=args.quantize)
    print(benchmark.format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
