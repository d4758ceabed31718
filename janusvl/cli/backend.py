"""What the batch commands (`caption`, `imagine --prompts`) share: where the model runs."""

from __future__ import annotations

import argparse

from ..batch.jobs import BACKENDS, Backend, Summary
from .common import status


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="local: this process; ray: a Ray Data pipeline, on the cluster at RAY_ADDRESS "
                             "or on this machine (needs janusvl[ray]) (default: local)")
    parser.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="Ray: model replicas (actors), each loading the model once (default: 1)")
    parser.add_argument("--cpus-per-replica", type=float, default=1, metavar="N",
                        help="Ray: CPUs reserved for each replica (default: 1)")
    parser.add_argument("--gpus-per-replica", type=float, default=0, metavar="N",
                        help="Ray: GPUs reserved for each replica (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh instead of resuming from what the output already holds")


def backend_from_args(args: argparse.Namespace) -> Backend:
    return Backend(args.backend, args.replicas, args.cpus_per_replica, args.gpus_per_replica)


def load_options(args: argparse.Namespace) -> dict[str, str]:
    return {"device": args.device, "dtype": args.dtype, "quantize": args.quantize}


def report(summary: Summary, unit: str) -> int:
    """Print the summary line; exit status 0 (failed rows are recorded, not fatal)."""
    status(summary.line(unit))
    return 0
