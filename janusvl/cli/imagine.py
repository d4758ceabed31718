"""`janusvl imagine MODEL PROMPT`: generate images from text and save them as numbered PNGs.

Files are named image-000.png, image-001.png, ... in the output directory, numbered after the
highest image-NNN.png already there, so repeated runs add images and never overwrite one.
Arguments and the output directory are checked before the model loads, so mistakes fail fast.
"""

from __future__ import annotations

import argparse
import math
import re
import secrets
import tempfile
from pathlib import Path

from PIL import Image

from ..validation import MAX_CFG_WEIGHT, MAX_IMAGES, MIN_TEMPERATURE
from .backend import add_backend_options, backend_from_args, load_options, report
from .common import CommandError, add_model_options, check_device, load, seed_option, status

NAME = re.compile(r"image-(\d+)\.png")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _num_images(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_IMAGES} images per run, got {text!r}")
    return value


def _cfg_weight(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_CFG_WEIGHT:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_CFG_WEIGHT:g}, got {text!r}")
    return value


def _temperature(text: str) -> float:
    value = _positive_float(text)
    if value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"expected at least {MIN_TEMPERATURE:g}, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "imagine", help="generate images from a text prompt",
        description="Generate images from a text prompt (classifier-free guidance over VQ codes) and "
                    "save them as image-NNN.png, numbered after any already in the output directory.")
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or Hub id (e.g. deepseek-ai/Janus-Pro-7B)")
    parser.add_argument("prompt", metavar="PROMPT", nargs="?", help="what the images should show")
    parser.add_argument("-n", "--num-images", type=_num_images, default=1, metavar="N",
                        help=f"images to generate, in one batch, at most {MAX_IMAGES} (default: 1)")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("."), metavar="DIR",
                        help="where to save the PNGs, created if missing (default: current directory)")
    parser.add_argument("--cfg-weight", type=_cfg_weight, default=5.0,
                        help=f"classifier-free guidance scale, at most {MAX_CFG_WEIGHT:g} (default: 5)")
    parser.add_argument("--temperature", type=_temperature, default=1.0,
                        help="sampling temperature (default: 1)")
    parser.add_argument("--seed", type=seed_option, default=None,
                        help="seed for reproducible images; without it a random seed is used and printed")
    add_model_options(parser)
    add_prompts_options(parser)
    parser.set_defaults(run=run)


def add_prompts_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "many prompts (--prompts FILE)",
        "Render every prompt of FILE (one per line, or JSONL with prompt and optional n, seed) into "
        "DIR as NNNNN-K.png with a manifest.jsonl; re-running skips the PNGs already there. -n is the "
        "default n; an entry without a seed gets --seed (default 0) plus its index.")
    group.add_argument("--prompts", type=Path, default=None, metavar="FILE", help="a file of prompts")
    group.add_argument("--batch-size", type=_positive_int, default=4, metavar="N",
                       help="images generated together, across prompts (default: 4)")
    add_backend_options(group)


def run_prompts(args: argparse.Namespace) -> int:
    from ..batch import imagine_job

    check_device(args.device)
    summary = imagine_job(args.model, args.prompts, args.output_dir, n=args.num_images,
                          seed=0 if args.seed is None else args.seed, cfg_weight=args.cfg_weight,
                          temperature=args.temperature, batch_size=args.batch_size, overwrite=args.overwrite,
                          backend=backend_from_args(args), load=load_options(args))
    return report(summary, "prompts")


def prepare_output_dir(out: Path) -> None:
    """Create `out` and prove a file can be written in it, before minutes of generation."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise CommandError(f"cannot write to output directory {str(out)!r}: {exc.strerror or exc}") from None


def save_numbered(images: list[Image.Image], out: Path) -> list[Path]:
    """Save as image-NNN.png after the highest number present. Files are created exclusively, so
    one that appears meanwhile (another run) is stepped over, never overwritten."""
    taken = [int(m[1]) for f in out.iterdir() if (m := NAME.fullmatch(f.name))]
    index = max(taken, default=-1) + 1
    paths = []
    for image in images:
        while True:
            path = out / f"image-{index:03d}.png"
            index += 1
            try:
                with open(path, "xb") as f:
                    image.save(f, format="PNG")
                break
            except FileExistsError:
                continue
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    from ..generation.image import check_image_args, decode_image_tokens, generate_image_tokens

    if (args.prompt is None) == (args.prompts is None):
        raise CommandError("give either PROMPT or --prompts FILE")
    if args.prompts is not None:
        return run_prompts(args)
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    check_image_args(args.prompt, args.num_images, args.cfg_weight, args.temperature, seed)
    check_device(args.device)
    prepare_output_dir(args.output_dir)
    janus = load(args.model, args.device, args.dtype, args.quantize)
    status(f"Seed {seed}" + ("" if args.seed is not None else f" (pass --seed {seed} to repeat this run)"))
    tokens = generate_image_tokens(janus.model, janus.processor, args.prompt, n=args.num_images,
                                   cfg_weight=args.cfg_weight, temperature=args.temperature,
                                   seed=seed, progress=True, roles=janus.roles)
    status(f"Decoding {args.num_images} image(s) ...")
    images = decode_image_tokens(janus.model, tokens)
    for path in save_numbered(images, args.output_dir):
        print(path)
    return 0
