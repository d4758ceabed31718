"""`janusvl bench` end to end on a tiny checkpoint: both engines run, every figure is reported in
the table and the JSON, and the bounds are measured. (The figures themselves are not asserted:
speed is shown by the benchmark's output, not by tests.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import torch

from janusvl import benchmark
from test_cli import janusvl


def test_bench_reports_every_figure_for_both_engines(tiny_dir, tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = janusvl("bench", str(tiny_dir), "--new-tokens", "3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    measured = [key for key, *_ in benchmark.ROWS if "bin" not in key]  # .bin rows: default checkpoint only
    for engine in ("janusvl", "transformers"):
        figures = report[engine]
        assert "error" not in figures, figures
        missing = [k for k in measured if k not in figures and not (engine == "transformers" and k == "preprocess_ms")]
        assert not missing, (engine, missing)
        for key, value in figures.items():
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (engine, key, value)
    assert report["janusvl"]["prompt_tokens"] > 576  # the image's 576 tokens plus the question
    machine = report["machine"]
    assert machine["bandwidth_gbs"] > 0 and machine["gemm_gflops"] > 0 and machine["threads"] == 2
    assert set(report["bounds"]) >= {"vision_s", "ttft_s", "decode_tps_b1", "peak_rss_gb"}
    table = proc.stdout
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
