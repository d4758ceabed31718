"""`--backend ray`: the same jobs as a Ray Data pipeline, for more than one machine.

A table with an id column is read by Ray's workers (read_parquet / read_json / read_csv, then
the local reader's own row conversion); a folder, a glob or a table without ids is listed by
the driver as the local backend lists it (ids are paths or row positions, which a distributed
read does not know) and handed to Ray Data as blocks. `map_batches` runs the local backend's own
callable (`Captioner` or `Renderer`) in a pool of actors, each loading the model once; the
records come back to the driver, which writes them with the same resumable writer. Image files
are read by the actors, so on a cluster their paths must be visible to every node (shared
storage), and janusvl must be installed there. `ray.init()` joins the cluster named by
RAY_ADDRESS, or starts Ray on this machine when it is unset.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .inputs import CaptionInput, InputSet, RowMaker
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
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def _map(ray: Any, kind: str, ds: Any, count: int, model: str | Path, load: dict[str, Any], options: dict[str, Any],
         replicas: int, cpus_per_replica: float, gpus_per_replica: float) -> Iterator[dict[str, Any]]:
    """Run the actors over `ds` (`count` rows, already in blocks) and stream their records back."""
    ds = ds.map_batches(_Actor, fn_constructor_kwargs={"kind": kind, "model": str(model), "load": load,
                                                       "options": options},
                        batch_size=None, batch_format="pyarrow", num_cpus=cpus_per_replica,
                        num_gpus=gpus_per_replica or None,
                        compute=ray.data.ActorPoolStrategy(size=min(replicas, count),
                                                           max_tasks_in_flight_per_actor=1))
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


def _blocks(count: int, rows_per_block: int, replicas: int) -> int:
    """A few engine batches per block, and at least one block per replica so every actor works."""
    return max(min(replicas, count), math.ceil(count / rows_per_block))


def _from_records(ray: Any, records: list[dict[str, Any]], schema: Any, blocks: int) -> Any:
    import pyarrow as pa

    table = pa.Table.from_pylist(records, schema=schema)
    size = math.ceil(len(records) / blocks)
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, len(records), size)])


def _caption_schema_in() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("prompt", pa.string()), ("path", pa.string()), ("data", pa.binary())])


def _record(row: CaptionInput) -> dict[str, Any]:
    return {"id": row.id, "prompt": row.prompt, "path": row.image if isinstance(row.image, str) else None,
            "data": row.image if isinstance(row.image, bytes) else None}


def _to_rows(batch: Any, maker: RowMaker, id_column: str, skip: frozenset[str]) -> Any:
    """Ray's read of a table -> the captioner's input rows (those not done), on the workers."""
    import pyarrow as pa

    rows = [maker(str(r[id_column]), r) for r in batch.to_pylist() if str(r[id_column]) not in skip]
    return pa.Table.from_pylist([_record(r) for r in rows], schema=_caption_schema_in())


def ray_caption(model: str | Path, load: dict[str, Any], inputs: InputSet, skip: set[str], options: dict[str, Any],
                replicas: int = 1, cpus_per_replica: float = 1, gpus_per_replica: float = 0) -> Iterator[dict[str, Any]]:
    """Caption the rows of `inputs` not in `skip` on Ray; yields the records `Captioner.stream`
    yields, as blocks finish. A table with an id column is read by Ray's workers (read_parquet,
    read_json, read_csv); folders, globs and tables without ids are listed by the driver."""
    ray = require_ray()
    count = sum(row_id not in skip for row_id in inputs.ids)
    if not count:
        return
    blocks = _blocks(count, 4 * options.get("batch_size", 8), replicas)
    table = inputs.table
    if table is not None and table.id_column is not None:
        # Read and convert before the actors start: with every CPU reserved by an actor, a read
        # task queued behind them would never run.
        ds = table.ray_read(ray).map_batches(_to_rows, fn_kwargs={"maker": table.maker, "id_column": table.id_column,
                                                                  "skip": frozenset(skip)},
                                             batch_size=None, batch_format="pyarrow").repartition(blocks).materialize()
    else:
        ds = _from_records(ray, [_record(r) for r in inputs.rows(skip)], _caption_schema_in(), blocks)
    yield from _map(ray, "caption", ds, count, model, load, options, replicas, cpus_per_replica, gpus_per_replica)


def ray_imagine(model: str | Path, load: dict[str, Any], entries: Sequence[ImagineInput], options: dict[str, Any],
                replicas: int = 1, cpus_per_replica: float = 1, gpus_per_replica: float = 0) -> Iterator[dict[str, Any]]:
    """Render `entries` on Ray; yields the records `Renderer.stream` yields."""
    import pyarrow as pa

    ray = require_ray()
    if not entries:
        return
    schema = pa.schema([("index", pa.int64()), ("prompt", pa.string()), ("n", pa.int64()), ("seed", pa.int64())])
    records = [{"index": e.index, "prompt": e.prompt, "n": e.n, "seed": e.seed} for e in entries]
    ds = _from_records(ray, records, schema, _blocks(len(records), 2 * options.get("batch_size", 4), replicas))
    yield from _map(ray, "imagine", ds, len(records), model, load, options, replicas, cpus_per_replica,
                    gpus_per_replica)
