"""Render a file of prompts with one engine: the callable both `imagine --prompts` backends run.

The file holds one prompt per line, or JSONL records `{"prompt", "n", "seed"}` (n and seed
optional). Entry i (counting non-blank lines from 0) is saved as `{i:05d}-{k}.png`, k < n; an
entry without a seed gets `base_seed + i`, so a re-run draws the same images. Different
prompts are generated together, up to `batch_size` images in one guided batch, and each
entry's images equal `Janus.generate_images(prompt, n=n, seed=seed)`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..engine import Engine, Progress
from ..errors import InputError, JanusError
from ..generation.image import check_image_args
from .feed import run_requests
from .inputs import json_object

if TYPE_CHECKING:
    from ..api import Janus


@dataclass(frozen=True)
class ImagineInput:
    index: int
    prompt: str
    n: int
    seed: int

    @property
    def files(self) -> list[str]:
        return [f"{self.index:05d}-{k}.png" for k in range(self.n)]


def read_prompts(path: str | Path, n: int = 1, base_seed: int = 0, cfg_weight: float = 5.0,
                 temperature: float = 1.0) -> list[ImagineInput]:
    """The entries of a prompts file, each checked (errors name the line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the prompts file ({exc.strerror or exc})") from None
    numbered = [(no, line) for no, line in enumerate(lines, 1) if line.strip()]
    jsonl = path.suffix.lower() == ".jsonl" or bool(numbered and numbered[0][1].lstrip().startswith("{"))
    entries = []
    for index, (no, line) in enumerate(numbered):
        record = _record(path, no, line) if jsonl else {"prompt": line.strip()}
        entry = ImagineInput(index, record.get("prompt"), record.get("n", n), record.get("seed", base_seed + index))
        try:
            check_image_args(entry.prompt, entry.n, cfg_weight, temperature, entry.seed)
        except InputError as exc:
            raise InputError(f"{path} line {no}: {exc}") from None
        entries.append(entry)
    if not entries:
        raise InputError(f"{path}: no prompts in the file")
    return entries


def _record(path: Path, no: int, line: str) -> dict[str, Any]:
    record = json_object(path, no, line)
    unknown = set(record) - {"prompt", "n", "seed"}
    if unknown:
        raise InputError(f"{path} line {no}: unknown key(s) {', '.join(sorted(unknown))} (expected prompt, n, seed)")
    return record


class Renderer:
    """Generates each entry's images through one `Engine`, `batch_size` images together.

    `stream(entries)` yields one record per image, {"index", "file", "png", "error"} (the
    local backend); calling it on a pyarrow table of entries returns those records as a table
    (Ray's `map_batches`). A failed entry gives one record with `file` None and its error."""

    def __init__(self, janus: Janus, batch_size: int = 4, cfg_weight: float = 5.0, temperature: float = 1.0) -> None:
        self.batch_size = batch_size
        self.engine = Engine(janus, max_images=batch_size, max_queue=2 * batch_size).start()
        self.cfg_weight, self.temperature = cfg_weight, temperature

    def stream(self, entries: Iterable[ImagineInput],
               on_progress: Callable[[Progress], None] | None = None) -> Iterator[dict[str, Any]]:
        items = ((entry, self._request(entry)) for entry in entries)
        for outcome in run_requests(self.engine, items, 2 * self.batch_size, on_progress):
            entry = outcome.key
            if outcome.error is not None:
                message = str(outcome.error) if isinstance(outcome.error, JanusError) else repr(outcome.error)
                yield {"index": entry.index, "file": None, "png": None, "error": message}
                continue
            for file, image in zip(entry.files, outcome.images, strict=True):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                yield {"index": entry.index, "file": file, "png": buf.getvalue(), "error": None}

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        entries = [ImagineInput(r["index"], r["prompt"], r["n"], r["seed"]) for r in batch.to_pylist()]
        schema = pa.schema([("index", pa.int64()), ("file", pa.string()), ("png", pa.binary()),
                            ("error", pa.string())])
        return pa.Table.from_pylist(list(self.stream(entries)), schema=schema)

    def close(self) -> None:
        self.engine.close(timeout=0)

    def _request(self, entry: ImagineInput) -> Any:
        if entry.n > self.batch_size:
            return InputError(f"n={entry.n} is more than the batch size ({self.batch_size}): an entry's "
                              "images are generated together; raise --batch-size")
        try:
            return self.engine.image_request(entry.prompt, n=entry.n, cfg_weight=self.cfg_weight,
                                             temperature=self.temperature, seed=entry.seed)
        except JanusError as exc:
            return exc
