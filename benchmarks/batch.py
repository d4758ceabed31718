"""Throughput of the batch jobs: captions per minute (`janusvl caption`, local backend at batch 1
and at the default batch size, Ray on this machine with one and two replicas) and images per
minute (`janusvl imagine --prompts` at batch 1 and 4).

    python benchmarks/batch.py [MODEL] [--rows 32] [--tokens 32] [--prompts 4] [--skip-ray]

With no MODEL it writes the tiny random checkpoint (`--pro-1b`: a Janus-Pro-1B-sized one, 4 GB).
Each figure is a fresh job in this process on the already loaded model, or for the Ray rows a
job whose time includes starting the actors and loading the model in each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from janusvl import Janus  # noqa: E402
from janusvl.batch import Backend, caption_job, imagine_job  # noqa: E402


def make_inputs(root: Path, rows: int, prompts: int) -> tuple[Path, Path]:
    from conftest import make_image

    photos = root / "photos"
    photos.mkdir()
    for i in range(rows):
        make_image(320 + 7 * i, 240 + 5 * i, seed=i).save(photos / f"{i:04d}.jpg", quality=90)
    file = root / "prompts.txt"
    file.write_text("".join(f"picture number {i} of a quiet harbour\n" for i in range(prompts)))
    return photos, file


def timed(job, *args, **kwargs) -> tuple:
    """The job's summary and wall time (local jobs get the loaded model: no load in the time)."""
    start = time.perf_counter()
    summary = job(*args, **kwargs)
    return summary, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--pro-1b", action="store_true")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-imagine", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="janusvl-batch-bench-"))
    model = args.model
    if model is None:
        from janusvl.testing.checkpoint import write_checkpoint

        size = "pro-1b" if args.pro_1b else "tiny"
        model = write_checkpoint(root / "ckpt", size=size, dtype=torch.bfloat16 if args.pro_1b else torch.float32)
    photos, prompts = make_inputs(root, args.rows, args.prompts)
    load = {"device": "cpu", "dtype": args.dtype}
    janus = Janus.from_pretrained(model, **load)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch threads "
          f"{torch.get_num_threads()}; {args.rows} images, {args.tokens} new tokens each", flush=True)
    rows = []
    for batch in (1, 8):
        summary, seconds = timed(caption_job, janus, photos, root / f"local-{batch}.jsonl", batch_size=batch,
                                 max_new_tokens=args.tokens, progress=False)
        rows.append((f"caption, local, batch {batch}", 60 * summary.done / seconds, "captions/min"))
        print(*rows[-1], flush=True)
    if not args.skip_ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        for replicas in (1, 2):
            cpus = max(1, (os.cpu_count() or 2) // replicas)
            summary, seconds = timed(caption_job, model, photos, root / f"ray-{replicas}.jsonl", load=load,
                                     max_new_tokens=args.tokens, progress=False,
                                     backend=Backend("ray", replicas=replicas, cpus_per_replica=cpus))
            rows.append((f"caption, ray, {replicas} replica(s) x {cpus} CPU (incl. actor start)",
                         60 * summary.done / seconds, "captions/min"))
            print(*rows[-1], flush=True)
        ray.shutdown()
    if not args.skip_imagine:
        for batch in (1, 4):
            summary, seconds = timed(imagine_job, janus, prompts, root / f"images-{batch}", batch_size=batch,
                                     progress=False)
            rows.append((f"imagine --prompts, batch {batch}", 60 * summary.done / seconds, "images/min"))
            print(*rows[-1], flush=True)
    print()
    for name, value, unit in rows:
        print(f"{name:60s} {value:8.2f} {unit}")


if __name__ == "__main__":
    main()
