"""`--backend ray`: the same jobs as a Ray Data pipeline, for more than one machine.

The driver lists INPUT as the local backend does (so ids, and what is already done, are the
same) and hands the rows to Ray Data as blocks; `map_batches` runs the local backend's own
callable (`Captioner` or `Renderer`) in a pool of actors, each loading the model once; the
records come back to the driver, which writes them with the same resumable writer. Image files
are read by the actors, so on a cluster their paths must be visible to every node (shared
storage), and janusvl must be installed there. `ray.init()` joins the cluster named by
RAY_ADDRESS, or starts Ray on this machine when it is unset.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .inputs import CaptionInput
from .imagine import ImagineInput


class _Actor:
    """One replica: loads the model once, then runs the local backend's callable per block."""

    def __init__(self, kind: str, model: str, load: dict[str, Any], options: dict[str, Any]) -> None:
        from ..api import Janus
        from .caption import Captioner
        from .imagine import Renderer

        janus = Janus.from_pretrained(model, **load)
        self.fn = (Captioner if kind == "caption" else Renderer)(janus, **options)

    def __call__(self, batch: Any) -> Any:
        return self.fn(batch)


def require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--backend ray needs Ray Data: pip install 'janusvl[ray]'") from None
    if not ray.is_initialized():
        ray.init(logging_level="WARNING")  # RAY_ADDRESS set: join that cluster; unset: start one here
    ray.data.DataContext.get_current().enable_progress_bars = False  # the job draws its own
    return ray


def _run(kind: str, model: str | Path, load: dict[str, Any], options: dict[str, Any], records: list[dict[str, Any]],
         schema: Any, rows_per_block: int, replicas: int, cpus_per_replica: float,
         gpus_per_replica: float) -> Iterator[dict[str, Any]]:
    ray = require_ray()
    import pyarrow as pa

    if not records:
        return
    table = pa.Table.from_pylist(records, schema=schema)
    # Blocks of a few engine batches each, and at least one per replica so every actor works.
    blocks = max(min(replicas, len(records)), math.ceil(len(records) / rows_per_block))
    size = math.ceil(len(records) / blocks)
    ds = ray.data.from_arrow([table.slice(i, size) for i in range(0, len(records), size)])
    ds = ds.map_batches(_Actor, fn_constructor_kwargs={"kind": kind, "model": str(model), "load": load,
                                                       "options": options},
                        batch_size=None, batch_format="pyarrow", num_cpus=cpus_per_replica,
                        num_gpus=gpus_per_replica or None,
                        compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1))
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


def ray_caption(model: str | Path, load: dict[str, Any], rows: Sequence[CaptionInput], options: dict[str, Any],
                replicas: int = 1, cpus_per_replica: float = 1, gpus_per_replica: float = 0) -> Iterator[dict[str, Any]]:
    """Caption `rows` on Ray; yields the records `Captioner.stream` yields, in completion order."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("path", pa.string()), ("data", pa.binary())])
    records = [{"id": r.id, "prompt": r.prompt, "path": r.image if isinstance(r.image, str) else None,
                "data": r.image if isinstance(r.image, bytes) else None} for r in rows]
    per_block = 4 * options.get("batch_size", 8)
    yield from _run("caption", model, load, options, records, schema, per_block, replicas, cpus_per_replica,
                    gpus_per_replica)


def ray_imagine(model: str | Path, load: dict[str, Any], entries: Sequence[ImagineInput], options: dict[str, Any],
                replicas: int = 1, cpus_per_replica: float = 1, gpus_per_replica: float = 0) -> Iterator[dict[str, Any]]:
    """Render `entries` on Ray; yields the records `Renderer.stream` yields."""
    import pyarrow as pa

    schema = pa.schema([("index", pa.int64()), ("prompt", pa.string()), ("n", pa.int64()), ("seed", pa.int64())])
    records = [{"index": e.index, "prompt": e.prompt, "n": e.n, "seed": e.seed} for e in entries]
    per_block = 2 * options.get("batch_size", 4)
    yield from _run("imagine", model, load, options, records, schema, per_block, replicas, cpus_per_replica,
                    gpus_per_replica)
