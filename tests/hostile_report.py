"""The hostile corpus's bookkeeping: one `Outcome` per case tried, on any surface (library, CLI,
server), how a library or CLI case is run, and the summary table.

Test modules `record()` what they tried; conftest's `pytest_terminal_summary` prints `table()` at
the end of any run that tried a case. `python tests/hostile_report.py` runs the whole corpus
without pytest (a tiny checkpoint written to a temporary folder) and prints the same table.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from janusvl.errors import JanusError

SURFACES = ("library", "CLI", "server")
CASE_SECONDS = 30.0  # a case still running after this is a hang: a crash


@dataclass
class Outcome:
    surface: str
    group: str
    case: str
    ok: bool  # the expected error (type and message, or status and code), or served as documented
    crashed: bool  # an exception that is not a janusvl.errors type, a traceback, a 5xx, a hang
    got: str
    refused: bool = True  # an error was expected (not an odd but valid input, served)


OUTCOMES: list[Outcome] = []


def record(outcome: Outcome) -> Outcome:
    OUTCOMES.append(outcome)
    return outcome


def table(outcomes: list[Outcome], by_group: bool = True) -> str:
    """Per surface (and per group within it): cases tried, clear errors (the expected error),
    odd but valid inputs served as documented, other outcomes (a different error), crashes."""
    head = f"{'surface / group':<34}{'tried':>7}{'clear errors':>14}{'served':>8}{'wrong':>7}{'crashes':>9}"
    lines = [head, "-" * len(head)]

    def row(label: str, part: list[Outcome]) -> str:
        clear = sum(o.ok and o.refused for o in part)
        served = sum(o.ok and not o.refused for o in part)
        crashes = sum(o.crashed for o in part)
        wrong = len(part) - clear - served - crashes
        return f"{label:<34}{len(part):>7}{clear:>14}{served:>8}{wrong:>7}{crashes:>9}"

    for surface in SURFACES:
        part = [o for o in outcomes if o.surface == surface]
        if not part:
            continue
        lines.append(row(surface, part))
        if by_group:
            for group in sorted({o.group for o in part}):
                lines.append(row(f"  {group}", [o for o in part if o.group == group]))
    lines.append("-" * len(head))
    lines.append(row("total", outcomes))
    return "\n".join(lines)


# ---------------------------------------------------------------------- running cases

def within(seconds: float, call: Callable[[], Any]) -> Any:
    """`call()`'s result or exception; TimeoutError if it is still running after `seconds`."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"still running after {seconds:.0f} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def run_library(case: Any, world: Any) -> Outcome:
    """One library case (see hostile_cases.LibCase): its call must raise `case.error` with a
    message matching `case.pattern` (re.search), or, when `case.error` is None, return a value
    that `case.check` accepts. Any other exception, or a hang, is a crash."""
    def outcome(ok: bool, crashed: bool, got: str) -> Outcome:
        return Outcome("library", case.group, case.name, ok, crashed, got, case.error is not None)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bombs warn, then fail
            value = within(case.seconds, lambda: case.call(world))
    except JanusError as exc:
        got = f"{type(exc).__name__}: {exc}"
        ok = case.error is not None and isinstance(exc, case.error) and re.search(case.pattern, str(exc)) is not None
        return outcome(ok, False, got)
    except Exception as exc:  # noqa: BLE001 - anything else is what the corpus looks for
        return outcome(False, True, f"{type(exc).__name__}: {exc}")
    if case.error is not None:
        return outcome(False, False, f"returned {value!r:.80} (expected {case.error.__name__})")
    return outcome(case.check(value), False, f"returned {type(value).__name__}")


# The CLI cases run in one Python process (importing torch once), each through `janusvl.cli.main`
# exactly as the `janusvl` script calls it, with its own stdout and stderr and a time limit.
CLI_DRIVER = r"""
import contextlib, io, json, signal, sys, traceback
from janusvl.cli import main

class Hang(BaseException):
    pass

def alarm(signum, frame):
    raise Hang()

signal.signal(signal.SIGALRM, alarm)
results = []
for argv in json.load(sys.stdin):
    err, out = io.StringIO(), io.StringIO()
    signal.alarm(SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Hang:
        code = "hang"
    except BaseException:
        code, err = "traceback", io.StringIO(err.getvalue() + traceback.format_exc())
    finally:
        signal.alarm(0)
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_cli(cases: list[Any], argv_of: Callable[[Any], list[str]], env: dict[str, str] | None = None) -> list[Outcome]:
    """The CLI cases (see hostile_cases.CliCase), run by CLI_DRIVER in one subprocess: each must
    exit with `case.exit` and say `case.pattern` (re.search, multi-line: "^" starts any line) on
    stderr, without a traceback."""
    script = CLI_DRIVER.replace("SECONDS", str(int(CASE_SECONDS)))
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps([argv_of(c) for c in cases]),
                          capture_output=True, text=True, timeout=CASE_SECONDS * len(cases) + 120, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the CLI driver failed: {proc.stderr[-2000:]}")
    results = json.loads(proc.stdout.splitlines()[-1])
    return [cli_outcome(case, r["code"], r["stderr"]) for case, r in zip(cases, results, strict=True)]


def cli_outcome(case: Any, code: int | str, stderr: str) -> Outcome:
    crashed = not isinstance(code, int) or "Traceback (most recent call last)" in stderr
    ok = not crashed and code == case.exit and re.search(case.pattern, stderr, re.MULTILINE) is not None
    ok = ok and not any(text in stderr for text in case.absent)
    got = f"exit {code}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
    return Outcome("CLI", case.group, case.name, ok, crashed, got, case.exit != 0)


def run_cli_process(case: Any, argv: list[str], env: dict[str, str] | None = None) -> Outcome:
    """One CLI case as its own `python -m janusvl` process: the real entry point and exit status."""
    try:
        proc = subprocess.run([sys.executable, "-m", "janusvl", *argv], capture_output=True, text=True,
                              timeout=CASE_SECONDS + 30, stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        return Outcome("CLI", case.group, case.name, False, True, "hang")
    return cli_outcome(case, proc.returncode, proc.stderr)


# ---------------------------------------------------------------------- without pytest

def main() -> int:
    """Run the library, CLI and server corpora against a freshly written tiny checkpoint."""
    import tempfile
    from pathlib import Path

    import httpx
    import torch

    import hostile_cases
    from hostile_http import BODY_LIMIT, MAX_PIXELS, cases
    from janusvl import Janus
    from janusvl.testing.checkpoint import write_checkpoint
    from serving import LiveServer
    from test_hostile_server import READ_TIMEOUT, _raw_outcomes, _send

    with tempfile.TemporaryDirectory() as tmp:
        tiny_dir = write_checkpoint(Path(tmp) / "tiny", dtype=torch.float32, seed=1)
        janus = Janus.from_pretrained(tiny_dir, device="cpu", dtype="float32")
        world = hostile_cases.World(janus, tiny_dir, Path(tmp) / "scratch")
        for case in hostile_cases.library_cases():
            record(run_library(case, world))
        for outcome in hostile_cases.run_cli_cases(world):
            record(outcome)
        with LiveServer(janus, max_body_bytes=BODY_LIMIT, max_image_pixels=MAX_PIXELS,
                        read_timeout=READ_TIMEOUT) as live, httpx.Client(base_url=live.url, timeout=60) as client:
            for case in cases():
                record(_send(client, case))
            for outcome in _raw_outcomes(live):
                record(outcome)
    print(table(OUTCOMES))
    wrong = [o for o in OUTCOMES if not o.ok]
    for o in wrong:
        print(f"{o.surface} / {o.case}: got {o.got}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
