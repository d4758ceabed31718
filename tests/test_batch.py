"""Batch jobs: `caption` over folders and tables equals `Janus.chat`, resumes exactly once after
SIGKILL, does nothing when done; the Ray backend equals the local one; `imagine --prompts`
equals `generate_images` and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from janusvl import Janus
from janusvl.batch import Backend, CaptionSink, caption_job, caption_schema, imagine_job, read_inputs
from janusvl.cli import main
from janusvl.errors import InputError

from conftest import make_image

TOKENS = 6  # answers are cut here: the tiny model's greedy answers rarely end sooner
LOAD = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PNG, JPEG (in a subfolder), grayscale, RGBA, an extensionless PNG, a corrupt JPEG, a text file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    make_image(64, 48, seed=0).save(root / "a.png")
    make_image(50, 70, seed=1).save(root / "sub" / "b.jpg", quality=90)
    make_image(40, 40, "L", seed=2).save(root / "gray.png")
    make_image(30, 60, "RGBA", seed=3).save(root / "rgba.png")
    make_image(33, 31, seed=4).save(root / "noext", format="PNG")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 8)
    (root / "notes.txt").write_text("not an image\n")
    return root


def chat(janus, image, prompt: str = "Describe this image.") -> dict:
    result = janus.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": prompt}]}], max_new_tokens=TOKENS)
    return {"answer": result.text, "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "error": None}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(rows: list[dict]) -> dict[str, dict]:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicate ids: {sorted(ids)}"
    return {r["id"]: r for r in rows}


def test_directory_captions_equal_chat(janus, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    summary = caption_job(janus, photos, out, batch_size=3, max_new_tokens=TOKENS, progress=False)
    rows = by_id(jsonl(out))
    assert sorted(rows) == ["a.png", "corrupt.jpg", "gray.png", "noext", "rgba.png", "sub/b.jpg"]
    assert (summary.rows, summary.done, summary.failed, summary.already, summary.not_images) == (6, 6, 1, 0, 1)
    for name in ["a.png", "gray.png", "noext", "rgba.png", "sub/b.jpg"]:
        want = chat(janus, str(photos / name))
        assert {k: rows[name][k] for k in want} == want, name
        assert rows[name]["prompt"] == "Describe this image."
    assert rows["a.png"]["answer"] != rows["gray.png"]["answer"]  # the image reaches the model
    bad = rows["corrupt.jpg"]
    assert bad["answer"] is None and bad["prompt_tokens"] is None and "not a readable image" in bad["error"]
    # A glob takes the same files (ids relative to its fixed part); the text file is not an image.
    listed = read_inputs(f"{photos}/**/*", prompt="Q?")
    assert sorted(listed.ids) == sorted(rows) and listed.not_images == ["notes.txt"]


def test_tables_with_per_row_prompts_and_parquet_output(janus, photos: Path, tmp_path: Path) -> None:
    # JSONL: paths relative to the table, an id column, per-row prompts (an empty one takes --prompt).
    table = tmp_path / "t" / "rows.jsonl"
    table.parent.mkdir()
    records = [{"id": "r1", "file": str(Path(os.path.relpath(photos, table.parent)) / "a.png"), "q": "What is it?"},
               {"id": "r2", "file": str(photos / "gray.png"), "q": ""},
               {"id": "r3", "file": "missing.png", "q": "Where?"}]
    table.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "from-jsonl.parquet"
    summary = caption_job(janus, table, out, prompt="Say something.", image_column="file", prompt_column="q",
                          batch_size=2, max_new_tokens=TOKENS, progress=False)
    assert summary.done == 3 and summary.failed == 1
    got = pq.read_table(out)
    assert got.schema == caption_schema()
    assert got.column_names == ["id", "prompt", "answer", "finish_reason", "prompt_tokens", "completion_tokens",
                                "error"]
    rows = by_id(got.to_pylist())
    assert rows["r1"]["prompt"] == "What is it?" and rows["r2"]["prompt"] == "Say something."
    for row_id, image, prompt in [("r1", photos / "a.png", "What is it?"), ("r2", photos / "gray.png", "Say something.")]:
        want = chat(janus, str(image), prompt)
        assert {k: rows[row_id][k] for k in want} == want
    assert rows["r3"]["answer"] is None and "no such image file" in rows["r3"]["error"]
    assert not (tmp_path / "from-jsonl.parquet.partial.jsonl").exists()  # the journal is merged away

    # Parquet: image bytes, no id column (ids are row positions), per-row prompts; JSONL output.
    data = [(photos / "rgba.png").read_bytes(), (photos / "sub" / "b.jpg").read_bytes()]
    pq.write_table(pa.table({"image": data, "prompt": ["Colours?", "Shapes?"]}), tmp_path / "rows.parquet")
    out2 = tmp_path / "from-parquet.jsonl"
    caption_job(janus, tmp_path / "rows.parquet", out2, prompt_column="prompt", max_new_tokens=TOKENS, progress=False)
    rows = by_id(jsonl(out2))
    assert sorted(rows) == ["0", "1"]
    for row_id, raw, prompt in [("0", data[0], "Colours?"), ("1", data[1], "Shapes?")]:
        assert {k: rows[row_id][k] for k in chat(janus, raw, prompt)} == chat(janus, raw, prompt)


def test_bad_inputs_are_named(photos: Path, tmp_path: Path) -> None:
    table = tmp_path / "dup.jsonl"
    table.write_text('{"id": 1, "image": "a.png"}\n{"id": 1, "image": "b.png"}\n')
    with pytest.raises(InputError, match="id '1' appears twice"):
        read_inputs(table)
    with pytest.raises(InputError, match="--prompt-column 'q' is not a column"):
        read_inputs(table, prompt_column="q")
    with pytest.raises(InputError, match="must end in .jsonl or .parquet"):
        CaptionSink(tmp_path / "out.csv")


def run_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "janusvl", "caption", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_sigkill_then_rerun_gives_every_row_once(janus, tiny_dir: Path, tmp_path: Path, suffix: str) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(10):
        make_image(40 + i, 30 + 2 * i, seed=10 + i).save(folder / f"img{i:02d}.png")
    out = tmp_path / f"out{suffix}"
    log = out.with_name(out.name + ".partial.jsonl") if suffix == ".parquet" else out
    args = [str(tiny_dir), str(folder), "-o", str(out), "--batch-size", "1", "--max-new-tokens", str(TOKENS),
            "--device", "cpu", "--dtype", "float32"]
    proc = run_cli(*args)
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_bytes().count(b"\n") >= 2):  # killed with rows written and rows to go
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    kept = log.read_bytes().count(b"\n")
    assert 2 <= kept < 10
    with open(log, "ab") as f:  # what a kill in the middle of a write leaves: a torn last line
        f.write(b'{"id": "img09.png", "prompt": "Describe th')
    proc = run_cli(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "dropped a torn last line" in err
    assert f"{10 - kept} rows done (0 failed), {kept} already done" in err
    rows = by_id(pq.read_table(out).to_pylist() if suffix == ".parquet" else jsonl(out))
    assert sorted(rows) == [f"img{i:02d}.png" for i in range(10)]
    for i in (0, 9):  # rows from before and after the kill are the library's answers
        want = chat(janus, str(folder / f"img{i:02d}.png"))
        assert {k: rows[f"img{i:02d}.png"][k] for k in want} == want


def test_a_finished_job_does_no_model_work(janus, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "done.parquet"
    caption_job(janus, photos, out, max_new_tokens=TOKENS, progress=False)
    before = out.read_bytes()
    # Were anything left to do, loading this model would fail.
    summary = caption_job(tmp_path / "no-such-model", photos, out, progress=False)
    assert (summary.done, summary.already) == (0, 6) and out.read_bytes() == before


def test_parquet_merge_is_idempotent(tmp_path: Path) -> None:
    """A kill between writing the Parquet file and removing the journal duplicates nothing."""
    out = tmp_path / "x.parquet"
    row = {"id": "a", "prompt": "p", "answer": "t", "finish_reason": "stop", "prompt_tokens": 3,
           "completion_tokens": 1, "error": None}
    sink = CaptionSink(out)
    sink.append([row])
    journal = sink.log.path.read_bytes()
    sink.close()
    sink.log.path.write_bytes(journal)  # as if killed before the journal was removed
    sink = CaptionSink(out)
    assert sink.done == {"a"}
    sink.append([{**row, "id": "b"}])
    sink.close()
    assert sorted(pq.read_table(out).column("id").to_pylist()) == ["a", "b"]


def test_ray_backend_equals_local(tiny_dir: Path, photos: Path, tmp_path: Path) -> None:
    import ray  # in the test extra: the Ray backend is tested, never skipped
    local = tmp_path / "local.jsonl"
    caption_job(tiny_dir, photos, local, load=LOAD, batch_size=2, max_new_tokens=TOKENS, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        remote = tmp_path / "ray.parquet"
        summary = caption_job(tiny_dir, photos, remote, load=LOAD, batch_size=2, max_new_tokens=TOKENS,
                              progress=False, backend=Backend("ray", replicas=2, cpus_per_replica=1))
        assert summary.done == 6
        assert by_id(pq.read_table(remote).to_pylist()) == by_id(jsonl(local))
        # A table with ids is read by Ray's workers (read_json); one row is already done.
        table = tmp_path / "rows.jsonl"
        table.write_text("".join(json.dumps({"id": f"k{i}", "image": str(photos / name), "q": q}) + "\n" for i, (name, q)
                                 in enumerate([("a.png", "Why?"), ("rgba.png", ""), ("sub/b.jpg", "Who?")])))
        for out, backend in [(tmp_path / "t-local.jsonl", Backend()), (tmp_path / "t-ray.jsonl", Backend("ray", 2))]:
            out.write_text(json.dumps({"id": "k1", "answer": "done before"}) + "\n")
            summary = caption_job(tiny_dir, table, out, load=LOAD, prompt_column="q", max_new_tokens=TOKENS,
                                  progress=False, backend=backend)
            assert (summary.done, summary.already) == (2, 1)
        assert by_id(jsonl(tmp_path / "t-ray.jsonl")) == by_id(jsonl(tmp_path / "t-local.jsonl"))
        # imagine --prompts: two prompts on two replicas, one image each.
        file = tmp_path / "prompts.txt"
        file.write_text("a red fox\nblue sky\n")
        out = tmp_path / "renders"
        summary = imagine_job(tiny_dir, file, out, seed=5, batch_size=1, load=LOAD, progress=False,
                              backend=Backend("ray", replicas=2, cpus_per_replica=1))
        assert summary.done == 2  # the manifest lists images as they finish
        assert sorted(r["file"] for r in jsonl(out / "manifest.jsonl")) == ["00000-0.png", "00001-0.png"]
        # Each actor computes with one thread (Ray sets OMP_NUM_THREADS to its CPUs); the VQ
        # decoder's fp32 convolutions round differently with two, so the reference uses one too.
        janus = Janus.from_pretrained(tiny_dir, **LOAD)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            want = [janus.generate_images(prompt, seed=5 + i)[0] for i, prompt in enumerate(["a red fox", "blue sky"])]
        finally:
            torch.set_num_threads(threads)
        for i, image in enumerate(want):
            with Image.open(out / f"{i:05d}-0.png") as im:
                assert np.array_equal(np.asarray(im), np.asarray(image))
    finally:
        ray.shutdown()


PROMPTS = [{"prompt": "a red fox", "n": 2, "seed": 3}, {"prompt": "blue sky over hills", "n": 2},
           {"prompt": "a cat", "n": 2, "seed": 11}]


def test_imagine_prompts_equal_generate_images_and_resume(janus, tiny_dir: Path, tmp_path: Path, capsys) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "images"
    argv = ["imagine", str(tiny_dir), "--prompts", str(file), "-o", str(out), "--seed", "100", "--batch-size", "4",
            "--device", "cpu", "--dtype", "float32"]
    assert main(argv) == 0
    names = [f"{i:05d}-{k}.png" for i in range(3) for k in range(2)]
    assert sorted(p.name for p in out.glob("*.png")) == names
    seeds = [3, 101, 11]  # an entry without a seed gets --seed plus its index
    want = [janus.generate_images(entry["prompt"], n=2, seed=seed) for entry, seed in zip(PROMPTS, seeds, strict=True)]
    for i in range(3):
        for k in range(2):
            with Image.open(out / f"{i:05d}-{k}.png") as im:
                assert (im.format, im.size) == ("PNG", (384, 384))
                assert np.array_equal(np.asarray(im), np.asarray(want[i][k])), (i, k)
    manifest = jsonl(out / "manifest.jsonl")
    assert [(r["file"], r["prompt"], r["seed"], r["cfg_weight"]) for r in manifest] == \
        [(n, PROMPTS[int(n[:5])]["prompt"], seeds[int(n[:5])], 5.0) for n in names]

    # Resume: one image lost, the manifest's last line torn; only that entry is drawn again.
    kept = {n: (out / n).stat().st_mtime_ns for n in names}
    (out / "00001-1.png").unlink()
    text = (out / "manifest.jsonl").read_bytes()
    (out / "manifest.jsonl").write_bytes(text[:-10])
    capsys.readouterr()
    assert main(argv) == 0
    assert "1 prompts done (0 failed), 2 already done" in capsys.readouterr().err
    assert [n for n in names if (out / n).stat().st_mtime_ns != kept.get(n)] == ["00001-1.png"]
    assert [r["file"] for r in jsonl(out / "manifest.jsonl")] == names
    with Image.open(out / "00001-1.png") as im:
        assert np.array_equal(np.asarray(im), np.asarray(want[1][1]))


def test_imagine_prompts_errors(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "p.txt"
    text.write_text("a fox\n\n   \n")
    assert main(["imagine", str(tiny_dir), "x", "--prompts", str(text)]) == 1
    assert "either PROMPT or --prompts" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b", "n": 0}\n')
    assert main(["imagine", str(tiny_dir), "--prompts", str(bad), "-o", str(tmp_path / "o")]) == 1
    assert "bad.jsonl line 2: n must be >= 1, got 0" in capsys.readouterr().err
    big = tmp_path / "big.jsonl"
    big.write_text('{"prompt": "a", "n": 5}\n')
    assert main(["imagine", str(tiny_dir), "--prompts", str(big), "-o", str(tmp_path / "o")]) == 1
    assert "more than the batch size 4" in capsys.readouterr().err


def test_caption_batch_api(janus, photos: Path) -> None:
    image = Image.open(photos / "a.png")
    records = janus.caption_batch([image, str(photos / "corrupt.jpg"), str(photos / "gray.png")],
                                  prompt=["What?", "Why?", "Who?"], batch_size=2, max_new_tokens=TOKENS)
    assert [r["prompt"] for r in records] == ["What?", "Why?", "Who?"]
    assert {k: records[0][k] for k in chat(janus, image, "What?")} == chat(janus, image, "What?")
    assert {k: records[2][k] for k in chat(janus, str(photos / "gray.png"), "Who?")} == \
        chat(janus, str(photos / "gray.png"), "Who?")
    assert "not a readable image" in records[1]["error"]
