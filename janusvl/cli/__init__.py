"""The `janusvl` command line: one subcommand per module of this package.

Each name in COMMANDS is a module here that exposes `add_parser(subparsers)`: it adds its
subparser and sets `run` (parsed args -> exit status) as that parser's default. Adding a
command is writing such a module and adding its name to the list.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS = ["chat", "demo", "imagine", "convert", "bench", "serve", "caption"]


class _Parser(argparse.ArgumentParser):
    """Lets positionals follow options (`chat MODEL --image X PROMPT`), which plain argparse
    refuses once an optional positional has been passed over."""

    _parsing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._parsing:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="janusvl", description="Run DeepSeek's Janus models: answer questions about images, generate images.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"janusvl {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `janusvl` script and `python -m janusvl`; returns the exit status."""
    from ..errors import JanusError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except JanusError as exc:
        # Expected failures (bad path, bad image, bad value) get one line, not a traceback.
        print(f"janusvl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python's exit-time flush
        # of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
