"""Where batch jobs write: append-only files that a killed run resumes from, exactly once.

JSONL is appended a batch at a time (one write, flushed and fsynced), so a SIGKILL can only
leave a torn *last* line; opening the file again cuts that line off, and the rows before it
are done. Parquet cannot be appended safely (its footer comes last), so rows are journaled to
`OUTPUT.partial.jsonl` the same way and the Parquet file is written once, when the run
finishes: to a temporary file, fsynced, then renamed over OUTPUT (atomic). A run killed during
that step left either the old file or the new one, and the journal; the next run merges them
again, by id, so no row is written twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InputError
from .inputs import require_pyarrow

# The columns of a caption output, in order (Parquet types in `caption_schema`).
CAPTION_COLUMNS = ("id", "prompt", "answer", "finish_reason", "prompt_tokens", "completion_tokens", "error")


def caption_schema() -> Any:
    pa = require_pyarrow("Parquet output")
    return pa.schema([("id", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
                      ("finish_reason", pa.string()), ("prompt_tokens", pa.int64()),
                      ("completion_tokens", pa.int64()), ("error", pa.string())])


class JsonlLog:
    """An append-only JSONL file of records keyed by `key`; `keys` holds those already written."""

    def __init__(self, path: Path, key: str = "id", overwrite: bool = False) -> None:
        self.path, self.key = path, key
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")
        _lock(self._file, path)
        if overwrite:
            self._file.truncate(0)
        self.torn = _cut_torn_line(path)
        self.keys: set[str] = {str(r[key]) for r in self.records()}

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{self.path} line {n}: not JSON; this file was not written by "
                                     "janusvl (use --overwrite to start afresh)") from None
                if not isinstance(record, dict) or self.key not in record:
                    raise InputError(f"{self.path} line {n}: a record without {self.key!r}")
                yield record

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Write `records` in one call, then flush and fsync: after this they survive a kill."""
        records = list(records)
        if not records:
            return
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.keys.update(str(r[self.key]) for r in records)

    def close(self) -> None:
        self._file.close()


def _lock(file: BinaryIO, path: Path) -> None:
    """Hold an exclusive lock while writing: two runs appending to one file would interleave."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.close()
        raise InputError(f"{path}: another run is writing this file") from None


def _cut_torn_line(path: Path) -> bool:
    """Truncate `path` after its last newline (a write cut short by a kill); True if it did."""
    if not path.exists():
        return False
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(max(size - 1, 0))
        if f.read(1) == b"\n":
            return False
        end = 0  # find the last newline, reading backwards in blocks
        pos = size
        while pos > 0:
            start = max(pos - 65536, 0)
            f.seek(start)
            found = f.read(pos - start).rfind(b"\n")
            if found >= 0:
                end = start + found + 1
                break
            pos = start
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    return True


class CaptionSink:
    """The output of `caption`: `done` ids, `append(rows)`, and `close()` to finish the file."""

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".parquet"):
            raise InputError(f"{self.path}: the output must end in .jsonl or .parquet")
        self.parquet = suffix == ".parquet"
        if self.parquet:
            require_pyarrow("Parquet output")
        log_path = self.path.with_name(self.path.name + ".partial.jsonl") if self.parquet else self.path
        self.log = JsonlLog(log_path, overwrite=overwrite)
        if self.parquet and overwrite:
            self.path.unlink(missing_ok=True)
        self.finished_ids = _parquet_ids(self.path) if self.parquet else set()

    @property
    def torn(self) -> bool:
        return self.log.torn

    @property
    def done(self) -> set[str]:
        return self.log.keys | self.finished_ids

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        self.log.append(rows)

    def close(self) -> None:
        """For Parquet, merge the journal into OUTPUT (atomically) and remove the journal."""
        self.log.close()
        if not self.parquet or not self.log.path.exists():
            return
        pa = require_pyarrow("Parquet output")
        pq = pa.parquet
        new = [r for r in self.log.records() if str(r["id"]) not in self.finished_ids]
        parts = [pq.read_table(self.path, schema=caption_schema())] if self.path.exists() else []
        if new or not parts:
            parts.append(pa.Table.from_pylist([{c: r.get(c) for c in CAPTION_COLUMNS} for r in new],
                                              schema=caption_schema()))
            table = pa.concat_tables(parts)
            tmp = self.path.with_name(self.path.name + ".tmp")
            pq.write_table(table, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.finished_ids |= {str(r["id"]) for r in new}
        self.log.path.unlink()


def _parquet_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    pq = require_pyarrow("Parquet output").parquet
    try:
        return {str(v) for v in pq.read_table(path, columns=["id"]).column("id").to_pylist()}
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputError(f"{path}: not a caption Parquet file ({exc}); use --overwrite to start afresh") from None
