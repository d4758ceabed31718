"""Caption rows with one engine: the callable both backends run.

Rows are opened and preprocessed (image decode, resize, tokenising) in a thread pool ahead of
the model; each window of prepared rows is sorted by prompt length and submitted to the engine,
which decodes `batch_size` of them together and lets the next one in as soon as one ends.
Greedy answers (temperature 0) are exactly `Janus.chat`'s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine import Engine
from ..engine.requests import ChatRequest
from ..errors import ImageLoadError, JanusError
from ..processing.images_io import read_image_file
from .feed import Outcome, run_requests
from .inputs import CaptionInput
from .outputs import CAPTION_COLUMNS, caption_schema

if TYPE_CHECKING:
    from ..api import Janus

Prepared = tuple[CaptionInput, ChatRequest | BaseException]


def caption_row(row: CaptionInput, outcome: Outcome[Any]) -> dict[str, Any]:
    """The output record of one row (see CAPTION_COLUMNS)."""
    if outcome.error is not None:
        return {"id": row.id, "prompt": row.prompt, "answer": None, "finish_reason": None,
                "prompt_tokens": None, "completion_tokens": None, "error": _message(outcome.error)}
    return {"id": row.id, "prompt": row.prompt, "answer": outcome.text, "finish_reason": outcome.finish_reason,
            "prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens, "error": None}


def _message(error: BaseException) -> str:
    # The row's id names the image; "bytes: " is how open_image names in-memory data.
    text = str(error).removeprefix("bytes: ")
    return text if isinstance(error, JanusError) else f"{type(error).__name__}: {text}"


class Captioner:
    """Answers `prompt` about each row's image through one `Engine`.

    `stream(rows)` yields output records as rows finish (the local backend); calling the
    captioner on a pyarrow table of rows returns a table of records (Ray's `map_batches`).
    `batch_size` rows decode together; `workers` threads prepare rows ahead of the model."""

    def __init__(self, janus: Janus, batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, workers: int = 4) -> None:
        self.limit = 2 * batch_size  # running plus waiting: the next row is ready when one ends
        self.window = 4 * batch_size  # rows sorted by prompt length together
        self.engine = Engine(janus, max_batch=batch_size, max_queue=self.limit).start()
        self.sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                         "top_k": top_k, "seed": seed}
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="janusvl-prepare")

    def stream(self, rows: Iterable[CaptionInput]) -> Iterator[dict[str, Any]]:
        for outcome in run_requests(self.engine, self._sorted(self._prepared(rows)), self.limit):
            yield caption_row(outcome.key, outcome)

    def __call__(self, batch: Any) -> Any:
        """pyarrow table with columns id, prompt, path (str) and data (bytes) -> caption table."""
        import pyarrow as pa

        rows = [CaptionInput(r["id"], r["data"] if r["data"] is not None else r["path"], r["prompt"])
                for r in batch.to_pylist()]
        records = list(self.stream(rows))
        return pa.Table.from_pylist([{c: r[c] for c in CAPTION_COLUMNS} for r in records],
                                    schema=caption_schema())

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        self.engine.close(timeout=0)

    def _prepare(self, row: CaptionInput) -> Prepared:
        """Read, decode and preprocess one row (in a pool thread); a bad row keeps its error."""
        try:
            image = row.image
            if isinstance(image, str) and image[:5].lower() != "data:":
                image = _read(Path(image), self.engine.janus.processor.image_limits.max_bytes)
            messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": row.prompt}]}]
            return row, self.engine.chat_request(messages, **self.sampling)
        except JanusError as exc:
            return row, exc

    def _prepared(self, rows: Iterable[CaptionInput]) -> Iterator[Prepared]:
        """Prepared rows in input order, with up to two windows' worth being prepared ahead."""
        ahead: deque[Future[Prepared]] = deque()
        for row in rows:
            ahead.append(self.pool.submit(self._prepare, row))
            if len(ahead) >= 2 * self.window:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    def _sorted(self, prepared: Iterator[Prepared]) -> Iterator[Prepared]:
        while window := list(islice(prepared, self.window)):
            yield from sorted(window, key=lambda p: p[1].prompt_tokens if isinstance(p[1], ChatRequest) else 0)


def _read(path: Path, max_bytes: int) -> bytes:
    """The file's bytes (regular files only, size-capped); errors without the path, which the
    row's id already names."""
    try:
        return read_image_file(path, max_bytes)
    except ImageLoadError as exc:
        raise ImageLoadError(str(exc).removeprefix(f"{path}: ")) from None
