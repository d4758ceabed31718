"""Suite 3, the library's and the CLI's part: every case of tests/hostile_cases.py gets its
expected `janusvl.errors` type and message (or exit status and stderr), nothing else escapes,
nothing hangs. Outcomes go into the combined table that conftest prints after the run (with the
server's, from test_hostile_server.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostile_cases import LibCase, World, cli_cases, library_cases, run_cli_cases
from hostile_report import record, run_library, table

LIBRARY = library_cases()


@pytest.fixture(scope="module")
def world(janus, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(janus, tiny_dir, tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("case", LIBRARY, ids=[c.name for c in LIBRARY])
def test_library_case(world: World, case: LibCase) -> None:
    outcome = record(run_library(case, world))
    assert outcome.ok, outcome.got


def test_the_corpus_is_large_and_named() -> None:
    assert len(LIBRARY) >= 150 and len(cli_cases()) >= 25
    assert len({c.name for c in cli_cases()}) == len(cli_cases())


def test_cli_cases(world: World) -> None:
    """All CLI cases in one driver process (`janusvl.cli.main`, as the script calls it), three of
    them again as their own `python -m janusvl` processes."""
    outcomes = [record(o) for o in run_cli_cases(world)]
    print("\n" + table(outcomes))
    wrong = [f"{o.case}: got {o.got}" for o in outcomes if not o.ok]
    assert not wrong, "\n".join(wrong)
    assert sum(o.case.endswith("[process]") for o in outcomes) == 3
    project = world.scratch / "project"  # convert --force refused, and deleted nothing
    assert sorted(p.name for p in project.iterdir()) == ["main.py", "notes.txt"]
