"""`janusvl convert SRC DST`: rewrite a checkpoint as sharded safetensors, or for transformers.

SRC is a checkpoint directory or Hub id in any of DeepSeek's weight layouts. The default target
keeps DeepSeek's layout (a lossless copy: same keys, same dtypes); `--to hf` writes the layout
transformers' `JanusForConditionalGeneration` and `AutoProcessor` load. `--quantize int8|int4`
stores the decoder quantised, ready to memory-map (janusvl.loading.quantized). See
janusvl.loading.convert.
"""

from __future__ import annotations

import argparse
import re
import time

from .common import status

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """"2GB" -> 2_000_000_000, "500MiB" -> 524_288_000, "1048576" -> bytes (as transformers reads them)."""
    m = _SIZE.fullmatch(text)
    unit = m and _UNITS.get(m[2].lower())
    size = int(float(m[1]) * unit) if m and unit else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 2GB, 500MB or 1GiB, got {text!r}")
    return size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="rewrite a checkpoint as sharded safetensors or in transformers' layout",
        description="Convert a Janus checkpoint (any of DeepSeek's weight layouts) into sharded "
                    "safetensors in DeepSeek's layout (a lossless copy), or into transformers' Janus "
                    "layout. Nothing appears at DST unless the conversion succeeds.")
    parser.add_argument("src", metavar="SRC",
                        help="checkpoint directory or Hub id (e.g. deepseek-ai/Janus-Pro-7B)")
    parser.add_argument("dst", metavar="DST",
                        help="new directory to write (must be empty or absent, unless --force)")
    parser.add_argument("--to", choices=["deepseek", "hf"], default="deepseek",
                        help="deepseek: same keys and dtypes as SRC, as sharded safetensors; hf: "
                             "transformers' JanusForConditionalGeneration layout (default: deepseek)")
    parser.add_argument("--max-shard-size", type=parse_size, default="2GB", metavar="SIZE",
                        help="largest weight file, e.g. 2GB, 500MB, 4GiB (default: 2GB)")
    parser.add_argument("--dtype", choices=["keep", "bfloat16", "float16", "float32"], default="keep",
                        help="cast floating-point weights; keep leaves every tensor as stored "
                             "(default: keep)")
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                        help="store the language model's projections as int8 rows or int4 groups, "
                             "loaded as they are with no quantising at load (deepseek layout only; "
                             "default: none)")
    parser.add_argument("--force", action="store_true",
                        help="replace DST if it is not empty (its contents are deleted)")
    parser.add_argument("--revision", default=None,
                        help="Hub revision (branch, tag or commit) when SRC is a Hub id")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..loading.convert import convert_checkpoint

    start = time.perf_counter()
    quantized = "" if args.quantize == "none" else f", {args.quantize} decoder"
    status(f"Converting {args.src} -> {args.dst} ({args.to} layout{quantized}) ...")
    dst = convert_checkpoint(args.src, args.dst, to=args.to, max_shard_bytes=args.max_shard_size,
                             dtype=args.dtype, progress=True, force=args.force, revision=args.revision,
                             quantize=args.quantize)
    files = sorted(p for p in dst.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    size = sum(p.stat().st_size for p in weights)
    status(f"Wrote {dst}: {len(weights)} weight file(s), {size / 1e9:.2f} GB, {len(files)} files in all, "
           f"in {time.perf_counter() - start:.1f} s")
    return 0
