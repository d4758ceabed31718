"""What `caption` reads: rows of (id, image, prompt) from a directory, a glob or a table.

A directory (searched recursively) or a glob gives one row per image file, its id the path
relative to the directory (the glob's fixed leading part). Files are taken by content: one
with an image extension is always a row (if it cannot be decoded, the row records the error),
one without is a row only when PIL recognises its header (an extensionless PNG); the rest
(`notes.txt`, `.DS_Store`) are not images and are skipped, and counted.

A table (.jsonl, .csv, .parquet) gives one row per record: the image column holds a path
(relative paths are taken from the table's folder), a `data:image/...` URL, the encoded
bytes, or a Hugging Face datasets image (`{"bytes", "path"}`); the prompt column, when given,
a per-row prompt (an empty cell takes the default prompt); the id column, when present, the
row's id (otherwise its 0-based position in the table). Ids must be unique: resuming skips
rows by id.

Reading is two passes: `InputSet.ids` (cheap: the listing, or the id column) is known before
anything loads, so a finished job does no work; `rows(skip)` then streams the rest.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError

DEFAULT_PROMPT = "Describe this image."
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class CaptionInput:
    """One row to caption: `image` is a file path, a data URL or encoded bytes."""
    id: str
    image: str | bytes
    prompt: str


def _has_image_extension(path: Path) -> bool:
    return path.suffix.lower() in Image.registered_extensions()


def is_image_file(path: Path) -> bool:
    """True for a file with an image extension or whose header PIL recognises."""
    if _has_image_extension(path):
        return True
    try:
        with Image.open(path):  # reads the header only
            return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


@dataclass
class InputSet:
    """The rows of one INPUT. `ids` in input order; `not_images` lists files passed over."""
    source: str
    ids: list[str]
    not_images: list[str] = field(default_factory=list)
    files: list[Path] | None = None  # a directory's or glob's image files, in `ids` order
    prompt: str = DEFAULT_PROMPT
    table: Table | None = None

    def rows(self, skip: set[str] | frozenset[str] = frozenset()) -> Iterator[CaptionInput]:
        """The rows whose ids are not in `skip`, in input order."""
        if self.table is not None:
            yield from self.table.rows(self.ids, skip)
            return
        for row_id, path in zip(self.ids, self.files or [], strict=True):
            if row_id not in skip:
                yield CaptionInput(row_id, str(path), self.prompt)


def read_inputs(source: str | Path, prompt: str = DEFAULT_PROMPT, image_column: str = "image",
                prompt_column: str | None = None, id_column: str | None = None) -> InputSet:
    """List INPUT (directory, glob or .jsonl/.csv/.parquet table); raises InputError naming
    what is wrong (missing path, unknown column, duplicate id)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"prompt must be a non-empty string, got {prompt!r}")
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return _file_set(text, path, files, prompt)
    if glob.has_magic(text):
        root = Path(_glob_root(text))
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(p))
        return _file_set(text, root, files, prompt)
    if not path.exists():
        raise InputError(f"{text}: no such file or directory")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(f"{text}: expected a directory, a glob, or a table ending in "
                         f"{', '.join(TABLE_SUFFIXES)}")
    table = Table(path, prompt, image_column, prompt_column, id_column)
    return InputSet(text, table.ids(), table=table)


def _glob_root(pattern: str) -> str:
    """The folder before the first wildcard: ids are relative to it."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _file_set(source: str, root: Path, files: list[Path], prompt: str) -> InputSet:
    images, others = [], []
    for f in files:
        (images if is_image_file(f) else others).append(f)
    def name(f: Path) -> str:
        return f.relative_to(root).as_posix() if f.is_relative_to(root) else f.as_posix()

    return InputSet(source, [name(f) for f in images], [name(f) for f in others],
                    files=[f.resolve() for f in images], prompt=prompt)


@dataclass(frozen=True)
class RowMaker:
    """Turns a table record into a row: the one conversion the local and Ray readers share."""
    folder: str  # relative image paths are taken from here
    prompt: str
    image_column: str
    prompt_column: str | None

    def __call__(self, row_id: str, record: dict[str, Any]) -> CaptionInput:
        prompt = record.get(self.prompt_column) if self.prompt_column else None
        return CaptionInput(row_id, self.image(record.get(self.image_column)),
                            prompt if isinstance(prompt, str) and prompt.strip() else self.prompt)

    def image(self, value: Any) -> str | bytes:
        """A path (made absolute against the table's folder), a data URL or bytes; anything
        else is handed on as is and fails, as that row's error, when it is opened."""
        if isinstance(value, dict):  # Hugging Face datasets' Image feature
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str) and value and not value.startswith("data:"):
            return str((Path(self.folder) / Path(value).expanduser()).resolve())
        return value if isinstance(value, str) else ""


class Table:
    """A .jsonl, .csv or .parquet file read as records, column by column names."""

    def __init__(self, path: Path, prompt: str, image_column: str, prompt_column: str | None,
                 id_column: str | None) -> None:
        self.path, self.prompt = path, prompt
        self.kind = path.suffix.lower()
        columns = self._columns()
        for flag, name in (("--image-column", image_column), ("--prompt-column", prompt_column),
                           ("--id-column", id_column)):
            if name is not None and name not in columns:
                raise InputError(f"{path}: {flag} {name!r} is not a column (columns: {', '.join(columns)})")
        self.image_column, self.prompt_column = image_column, prompt_column
        self.id_column = id_column if id_column is not None else ("id" if "id" in columns else None)
        self.maker = RowMaker(str(path.parent), prompt, image_column, prompt_column)

    def ids(self) -> list[str]:
        if self.id_column is None:
            return [str(i) for i, _ in enumerate(self._records([]))]
        ids, seen = [], set()
        for i, record in enumerate(self._records([self.id_column])):
            value = record.get(self.id_column)
            if value is None or value == "":
                raise InputError(f"{self.path}: row {i} has no {self.id_column!r}")
            row_id = str(value)
            if row_id in seen:
                raise InputError(f"{self.path}: id {row_id!r} appears twice in column {self.id_column!r} "
                                 "(ids must be unique: a resumed run skips rows by id)")
            seen.add(row_id)
            ids.append(row_id)
        return ids

    def rows(self, ids: list[str], skip: set[str] | frozenset[str]) -> Iterator[CaptionInput]:
        for row_id, record in zip(ids, self._records(self.wanted), strict=True):
            if row_id not in skip:
                yield self.maker(row_id, record)

    @property
    def wanted(self) -> list[str]:
        return [c for c in (self.id_column, self.image_column, self.prompt_column) if c is not None]

    def ray_read(self, ray: Any) -> Any:
        """The table as a Ray dataset read by Ray's workers (only the columns used)."""
        if self.kind == ".parquet":
            return ray.data.read_parquet(str(self.path), columns=self.wanted)
        if self.kind == ".csv":  # every cell a string, as the csv module reads it
            import pyarrow as pa
            import pyarrow.csv

            types = {c: pa.string() for c in self._columns()}
            return ray.data.read_csv(str(self.path), convert_options=pyarrow.csv.ConvertOptions(column_types=types))
        return ray.data.read_json(str(self.path), lines=True)

    def _columns(self) -> list[str]:
        if self.kind == ".parquet":
            return list(_parquet_file(self.path).schema_arrow.names)
        if self.kind == ".csv":
            with open(self.path, newline="", encoding="utf-8") as f:
                return next(csv.reader(f), [])
        names: dict[str, None] = {}
        for record in self._records(None):
            names.update(dict.fromkeys(record))
        return list(names)

    def _records(self, columns: list[str] | None) -> Iterator[dict[str, Any]]:
        """Each record as a dict (only `columns` when not None), streamed."""
        if self.kind == ".parquet":
            pf = _parquet_file(self.path)
            if columns == []:
                yield from ({} for _ in range(pf.metadata.num_rows))
                return
            for batch in pf.iter_batches(batch_size=256, columns=columns):
                yield from batch.to_pylist()
        elif self.kind == ".csv":
            with open(self.path, newline="", encoding="utf-8") as f:
                yield from csv.DictReader(f)
        else:
            yield from _jsonl_records(self.path)


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield json_object(path, n, line)


def json_object(path: Path, n: int, line: str) -> dict[str, Any]:
    """Line `n` of a JSONL file as a dict; InputError naming the file and line otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} line {n}: not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise InputError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
    return record


def _parquet_file(path: Path) -> Any:
    pq = require_pyarrow("reading Parquet").parquet
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None


def require_pyarrow(what: str) -> Any:
    """pyarrow with its parquet module, or a clear error naming the extra that brings it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InputError(f"{what} needs pyarrow: pip install 'janusvl[batch]'") from None
    return pyarrow
