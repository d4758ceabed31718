"""`janusvl bench` end to end on a tiny checkpoint: both engines run, in the dtype this CPU class
calls for, every figure is reported in the table and the JSON, and the bounds are measured. (The
figures themselves are not asserted: speed is shown by the benchmark's output, not by tests.)"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from janusvl import benchmark
from janusvl.config import JanusConfig
from janusvl.models import layers
from janusvl.testing.checkpoint import random_state_dict, save_weights
from test_cli import janusvl

IMAGE_SIZE = 128  # 8 x 8 = 64 image tokens


@pytest.fixture(scope="module")
def small_image_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with 128-pixel images. At 384 pixels, image generation (576 steps and a
    384 x 384 decode per image, five images per engine) was most of this test's minute of CPU."""
    dst = tmp_path_factory.mktemp("bench") / "ckpt"
    shutil.copytree(tiny_dir, dst)
    for name, edit in (("config.json", lambda c: c["vision_config"]["params"].update(image_size=IMAGE_SIZE)),
                       ("preprocessor_config.json", lambda c: c.update(image_size=IMAGE_SIZE)),
                       ("processor_config.json", lambda c: c.update(num_image_tokens=(IMAGE_SIZE // 16) ** 2))):
        config = json.loads((dst / name).read_text())
        edit(config)
        (dst / name).write_text(json.dumps(config))
    save_weights(random_state_dict(JanusConfig.from_file(dst / "config.json"), torch.float32, seed=1), dst, "safetensors")
    return dst


def test_bench_reports_every_figure_for_both_engines(small_image_dir, tmp_path) -> None:
    out = tmp_path / "bench.json"
    # One thread: on a busy machine, two threads wait on each other at each of the thousands of
    # small ops (measured on a shared 2-core machine: 4x the CPU time, 3.7x the wall time).
    proc = janusvl("bench", str(small_image_dir), "--new-tokens", "3", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    measured = [key for key, *_ in benchmark.ROWS if "bin" not in key]  # .bin rows: default checkpoint only
    for engine in ("janusvl", "transformers"):
        figures = {k: v for k, v in report[engine].items() if k not in ("dtype", "kernel")}  # names, not figures
        assert "error" not in figures, figures
        missing = [k for k in measured if k not in figures and not (engine == "transformers" and k == "preprocess_ms")]
        assert not missing, (engine, missing)
        for key, value in figures.items():
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (engine, key, value)
    # bf16 where the CPU has it; where it is emulated, transformers runs in float32 (as its users would)
    dtypes = {"janusvl": "bfloat16", "transformers": "bfloat16" if layers.native_bf16() else "float32"}
    assert {engine: report[engine].get("dtype") for engine in dtypes} == dtypes
    assert report["machine"]["native_bf16"] is layers.native_bf16()
    assert report["janusvl"]["prompt_tokens"] > (IMAGE_SIZE // 16) ** 2  # the image's tokens plus the question
    machine = report["machine"]
    assert machine["bandwidth_gbs"] > 0 and machine["gemm_gflops"] > 0 and machine["threads"] == 1
    # measured before and after each engine; the bounds take the best (a shared VM's rates move)
    for key in ("bandwidth_gbs", "gemm_gflops"):
        assert len(machine[f"{key}_seen"]) == 3 and machine[key] == max(machine[f"{key}_seen"]), key
    assert f"best of 3 measurements in the run; read {min(machine['bandwidth_gbs_seen']):.1f}" in proc.stdout
    assert set(report["bounds"]) >= {"vision_s", "ttft_s", "decode_tps_b1", "peak_rss_gb"}
    table = proc.stdout
    assert [line.split() for line in table.splitlines() if line.startswith("dtype ")] == [["dtype", *dtypes.values()]]
    assert ("native bf16," if layers.native_bf16() else "no native bf16") in table
    for key, label, unit, _ in benchmark.ROWS:
        assert (f"{label} ({unit})" in table) == (key in report["janusvl"]), label
    assert "transformers failed" not in table


def test_worker_peak_rss_is_its_own() -> None:
    """Linux keeps ru_maxrss across exec; the workers must not report the parent's peak."""
    big = torch.ones(512 * 1024 * 1024 // 4)  # 0.5 GB touched in this process
    big.add_(1)
    code = "from janusvl.benchmark import _rss_gb; print(_rss_gb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < benchmark._rss_gb() - 0.4
    del big


@pytest.mark.parametrize("native", [True, False])
def test_engines_run_in_the_dtype_a_user_would_choose(monkeypatch, native: bool) -> None:
    """Both CPU classes, whichever this machine is: torch's bf16 fallback is for no engine."""
    monkeypatch.setattr(layers, "native_bf16", lambda: native)
    assert benchmark.engine_dtypes() == {"janusvl": "bfloat16", "transformers": "bfloat16" if native else "float32"}
