"""`janusvl caption MODEL INPUT -o OUTPUT`: caption (or question) a folder or table of images.

Resumable: rows already in OUTPUT are skipped, so re-running the same command after a crash
or a kill finishes the job with every row written once. See janusvl.batch for the pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..batch import DEFAULT_PROMPT, caption_job
from .backend import add_backend_options, backend_from_args, load_options, report
from .common import (CommandError, add_image_options, add_model_options, add_sampling_options, check_device,
                     image_load_options, sampling_kwargs, status)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "caption", help="caption a folder, glob or table of images into JSONL or Parquet",
        description="Answer a prompt about every image of a folder (searched recursively; files taken by "
                    "content), a glob, or a .jsonl/.csv/.parquet table, writing one row per image to OUTPUT "
                    "(.jsonl or .parquet): id, prompt, answer, finish_reason, prompt_tokens, "
                    "completion_tokens, error. Re-running resumes.")
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or Hub id")
    parser.add_argument("input", metavar="INPUT", help="a directory, a glob (quoted) or a .jsonl/.csv/.parquet table")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT",
                        help="where rows go: a .jsonl or .parquet file")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help=f"the question for every image (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--image-column", default="image", metavar="NAME",
                        help="table column with the image: a path (relative to the table), a data URL or "
                             "bytes (default: image)")
    parser.add_argument("--prompt-column", default=None, metavar="NAME",
                        help="table column with a per-row prompt (empty cells use --prompt)")
    parser.add_argument("--id-column", default=None, metavar="NAME",
                        help="table column with unique row ids (default: 'id' if the table has it, "
                             "else the row's position)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="rows decoded together by the engine (default: 8)")
    parser.add_argument("--workers", type=int, default=4, metavar="N",
                        help="threads decoding and preprocessing images ahead of the model (default: 4)")
    add_backend_options(parser)
    add_sampling_options(parser, max_new_tokens=256)
    add_image_options(parser)
    add_model_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sampling = sampling_kwargs(args)
    if args.batch_size < 1 or args.workers < 1:
        raise CommandError("--batch-size and --workers must be >= 1")
    check_device(args.device)
    status(f"Captioning {args.input} -> {args.output}")
    summary = caption_job(args.model, args.input, args.output, prompt=args.prompt, image_column=args.image_column,
                          prompt_column=args.prompt_column, id_column=args.id_column, batch_size=args.batch_size,
                          workers=args.workers, overwrite=args.overwrite, backend=backend_from_args(args),
                          load={**load_options(args), **image_load_options(args)}, **sampling)
    return report(summary, "rows")
