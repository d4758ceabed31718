"""Whole batch jobs: reader, engine (local or Ray), resumable writer, progress and summary.

`caption_job` and `imagine_job` are what `janusvl caption` and `janusvl imagine --prompts` run.
Rows already in the output are skipped before anything loads, so a finished job does no model
work; the rest are written as they finish, a batch at a time.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm import tqdm

from .. import validation
from ..errors import InputError
from .caption import Captioner
from .imagine import ImagineInput, Renderer, read_prompts
from .inputs import DEFAULT_PROMPT, InputSet, read_inputs
from .outputs import CaptionSink, JsonlLog

if TYPE_CHECKING:
    from ..api import Janus

T = TypeVar("T")
BACKENDS = ("local", "ray")


@dataclass
class Summary:
    """What a job did. `rows`: in the input; `done`: finished by this run (`failed` of them with an
    error); `already`: found in the output and skipped; `not_images`: files passed over."""
    rows: int = 0
    done: int = 0
    failed: int = 0
    already: int = 0
    not_images: int = 0
    tokens: int = 0  # completion tokens generated (caption)
    seconds: float = 0.0

    def line(self, unit: str) -> str:
        rate = f", {60 * self.done / self.seconds:.1f} {unit}/min" if self.done and self.seconds else ""
        extra = f", {self.not_images} not images" if self.not_images else ""
        return (f"{self.done} {unit} done ({self.failed} failed), {self.already} already done{extra}; "
                f"{self.seconds:.1f} s{rate}")


@dataclass(frozen=True)
class Backend:
    """Where the model runs: `local` (this process) or `ray` (`replicas` actors)."""
    name: str = "local"
    replicas: int = 1
    cpus_per_replica: float = 1
    gpus_per_replica: float = 0

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {self.name!r}")
        validation.integer("replicas", self.replicas, minimum=1)
        validation.number("cpus_per_replica", self.cpus_per_replica, above=0)
        validation.number("gpus_per_replica", self.gpus_per_replica, minimum=0)


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _load(model: str | Path | Janus, load: dict[str, Any]) -> Janus:
    from ..api import Janus

    if isinstance(model, Janus):
        return model
    _note(f"Loading {model} ...")
    return Janus.from_pretrained(model, **load)


def _model_path(model: str | Path | Janus) -> str | Path:
    if not isinstance(model, (str, Path)):
        raise InputError("the Ray backend loads the model in each replica: give a checkpoint path or Hub id")
    return model


def caption_job(model: str | Path | Janus, source: str | Path, output: str | Path, *,
                prompt: str = DEFAULT_PROMPT, image_column: str = "image", prompt_column: str | None = None,
                id_column: str | None = None, batch_size: int = 8, workers: int = 4, overwrite: bool = False,
                backend: Backend = Backend(), load: dict[str, Any] | None = None, progress: bool = True,
                **sampling: Any) -> Summary:
    """Caption every row of `source` into `output` (.jsonl or .parquet), resuming what a previous
    run left. `model` is a loaded `Janus` (local backend only) or what `Janus.from_pretrained`
    takes, with `load` its keyword arguments; `sampling` goes to the engine (max_new_tokens,
    temperature, top_p, top_k, seed)."""
    start = time.perf_counter()
    _check_batch_size(batch_size)
    inputs = read_inputs(source, prompt, image_column, prompt_column, id_column)
    sink = CaptionSink(output, overwrite=overwrite)
    done = sink.done
    pending = [row_id for row_id in inputs.ids if row_id not in done]
    summary = Summary(rows=len(inputs.ids), already=len(inputs.ids) - len(pending), not_images=len(inputs.not_images))
    if sink.torn:
        _note(f"{sink.log.path}: dropped a torn last line left by an interrupted run")
    try:
        if pending:
            _caption(model, inputs, done, sink, summary, len(pending), backend, load or {},
                     {"batch_size": batch_size, "workers": workers, **sampling}, progress)
    except BaseException:
        sink.log.close()  # what was written stays, for the next run to resume from
        raise
    sink.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _caption(model: str | Path | Janus, inputs: InputSet, done: set[str], sink: CaptionSink, summary: Summary,
             total: int, backend: Backend, load: dict[str, Any], options: dict[str, Any], progress: bool) -> None:
    batch_size = options["batch_size"]
    if backend.name == "ray":
        from .ray_backend import ray_caption

        records = ray_caption(_model_path(model), load, inputs, done, options, backend.replicas,
                              backend.cpus_per_replica, backend.gpus_per_replica)
        _write_captions(records, sink, summary, total, batch_size, progress)
        return
    captioner = Captioner(_load(model, load), **options)
    try:
        _write_captions(captioner.stream(inputs.rows(skip=done)), sink, summary, total, batch_size, progress)
    finally:
        captioner.close()


def _write_captions(records: Iterable[dict[str, Any]], sink: CaptionSink, summary: Summary, total: int,
                    batch_size: int, progress: bool) -> None:
    began = time.perf_counter()
    with tqdm(total=total, unit="row", desc="caption", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for chunk in _batches(records, batch_size):
            sink.append(chunk)
            summary.done += len(chunk)
            summary.failed += sum(r["error"] is not None for r in chunk)
            summary.tokens += sum(r["completion_tokens"] or 0 for r in chunk)
            bar.set_postfix_str(f"{summary.tokens / (time.perf_counter() - began):.1f} tok/s", refresh=False)
            bar.update(len(chunk))


def imagine_job(model: str | Path | Janus, prompts: str | Path, output_dir: str | Path, *, n: int = 1,
                seed: int = 0, cfg_weight: float = 5.0, temperature: float = 1.0, batch_size: int = 4,
                overwrite: bool = False, backend: Backend = Backend(), load: dict[str, Any] | None = None,
                progress: bool = True) -> Summary:
    """Render every entry of the `prompts` file into `output_dir` as `{index:05d}-{k}.png`, with a
    `manifest.jsonl` (file, prompt, seed, cfg_weight, ...). PNGs already there are kept: an entry
    whose images all exist is skipped."""
    start = time.perf_counter()
    _check_batch_size(batch_size)
    entries = read_prompts(prompts, n, seed, cfg_weight, temperature)
    too_big = [e for e in entries if e.n > batch_size]
    if too_big:
        raise InputError(f"{prompts}: entry {too_big[0].index} asks for n={too_big[0].n} images, more than the "
                         f"batch size {batch_size} (an entry's images are generated together; raise the batch size)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        for file in entry.files:
            (out / (file + ".tmp")).unlink(missing_ok=True)  # left by a kill mid-write
            if overwrite:
                (out / file).unlink(missing_ok=True)
    manifest = JsonlLog(out / "manifest.jsonl", key="file", overwrite=overwrite)
    settings = {"cfg_weight": cfg_weight, "temperature": temperature}
    try:
        _check_manifest(manifest, entries, settings)
        pending = [e for e in entries if not all((out / f).exists() for f in e.files)]
        # Images saved by a run killed before it wrote their manifest lines.
        manifest.append(_manifest_records([e for e in entries if e not in pending], settings, manifest.keys))
        summary = Summary(rows=len(entries), already=len(entries) - len(pending))
        if pending:
            _render(model, pending, out, manifest, settings, summary, batch_size, backend, load or {}, progress)
    finally:
        manifest.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _render(model: str | Path | Janus, pending: list[ImagineInput], out: Path, manifest: JsonlLog,
            settings: dict[str, float], summary: Summary, batch_size: int, backend: Backend,
            load: dict[str, Any], progress: bool) -> None:
    by_index = {e.index: e for e in pending}
    # Image steps are counted where the engine runs: in this process only.
    steps = tqdm(total=None, unit="step", desc="steps", file=sys.stderr, position=1,
                 disable=not progress or backend.name != "local", leave=False, dynamic_ncols=True,
                 mininterval=0.5)
    bar = tqdm(total=len(pending), unit="prompt", desc="imagine", file=sys.stderr, disable=not progress,
               position=0, dynamic_ncols=True)
    options = {"batch_size": batch_size, **settings}
    renderer = None
    try:
        if backend.name == "ray":
            from .ray_backend import ray_imagine

            records = ray_imagine(_model_path(model), load, pending, options, backend.replicas,
                                  backend.cpus_per_replica, backend.gpus_per_replica)
        else:
            renderer = Renderer(_load(model, load), **options)
            records = renderer.stream(pending, on_progress=lambda _: steps.update())
        for record in records:
            entry = by_index[record["index"]]
            if record["error"] is not None:
                _note(f"prompt {entry.index} ({entry.prompt[:40]!r}): {record['error']}")
                summary.failed += 1
            elif not (out / record["file"]).exists():
                _write_atomic(out / record["file"], record["png"])
            if record["file"] is None or record["file"] == entry.files[-1]:
                if record["error"] is None:
                    manifest.append(_manifest_records([entry], settings, manifest.keys))
                summary.done += 1
                bar.update()
    finally:
        if renderer is not None:
            renderer.close()
        steps.close()
        bar.close()


def _manifest_records(entries: list[ImagineInput], settings: dict[str, float], have: set[str]) -> list[dict[str, Any]]:
    return [{"file": file, "prompt": e.prompt, "seed": e.seed, "n": e.n, "index": e.index, **settings}
            for e in entries for file in e.files if file not in have]


def _check_manifest(manifest: JsonlLog, entries: list[ImagineInput], settings: dict[str, float]) -> None:
    """Refuse to mix images of another prompts file or other settings into one directory."""
    expected = {r["file"]: r for r in _manifest_records(entries, settings, set())}
    for record in manifest.records():
        want = expected.get(record["file"])
        if want is not None and any(record.get(k) != want[k] for k in ("prompt", "seed", "n", *settings)):
            raise InputError(f"{manifest.path}: {record['file']} was made from other settings "
                             f"({record.get('prompt')!r}, seed {record.get('seed')}); use --overwrite "
                             "or another output directory")


def _write_atomic(path: Path, data: bytes) -> None:
    """A file that either does not exist or is whole: written aside, fsynced, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_batch_size(batch_size: int) -> None:
    validation.integer("batch_size", batch_size, minimum=1)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
