"""Speed and memory of janusvl beside transformers' Janus, with this machine's bounds.

Each engine runs in its own subprocess (so load time and peak RSS are its own), on the same
checkpoint, image and prompt, each in the dtype its users would choose on this CPU class
(`engine_dtypes`). The parent measures the machine's memory read bandwidth and GEMM rate and
prints every figure beside its bound. `janusvl bench` and benchmarks/bench.py call
`main`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

QUESTION = "Describe this image in detail."
IMAGE_PROMPT = "A watercolor painting of a lighthouse on a cliff at sunset."


def _now() -> float:
    return time.perf_counter()


def _rss_gb() -> float:
    """This process's peak resident memory. Linux's ru_maxrss survives exec, so a worker would
    report its parent's peak too; VmHWM belongs to the process image alone."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def test_image() -> Any:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    rgb = np.stack([x * 255 / 639, y * 255 / 479, (x + y) * 127 / 1118], -1) + rng.integers(-30, 30, (480, 640, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype("uint8"), "RGB")


# ---------------------------------------------------------------- machine bounds

def machine_bounds(threads: int) -> dict[str, Any]:
    """Memory read bandwidth (GB/s, a streaming reduction over 1 GiB) and GEMM rate (GFLOP/s) in
    bf16, or in fp32 on CPUs without native bf16 (where bf16 GEMMs are emulated, ~500x slower)."""
    from .models import layers

    torch.set_num_threads(threads)
    buf = torch.ones(256 * 1024 * 1024, dtype=torch.float32)  # 1 GiB, far beyond any cache
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(3))
    bandwidth = buf.numel() * 4 / best / 1e9
    del buf
    native = layers.native_bf16()
    dtype = torch.bfloat16 if native else torch.float32
    a = torch.randn(2048, 2048).to(dtype)
    a @ a
    gemm = min(_timed(lambda: a @ a) for _ in range(3))
    return {"bandwidth_gbs": bandwidth, "gemm_gflops": 2 * 2048 ** 3 / gemm / 1e9,
            "gemm_dtype": _dtype_name(dtype), "native_bf16": native}


def remeasure(machine: dict[str, Any]) -> None:
    """Measure the machine again and keep the best rates seen. A shared VM's read rate moves by up
    to a factor of two within a day (21 to 43 GB/s on the AVX2 machine of README's figures): a single
    low reading would put the bounds below what the machine delivers at other times, so the bounds
    use the best of a measurement before and after each engine's run."""
    again = machine_bounds(machine["threads"])
    for key in ("bandwidth_gbs", "gemm_gflops"):
        machine[f"{key}_seen"] = [*machine.get(f"{key}_seen", [machine[key]]), again[key]]
        machine[key] = max(machine[f"{key}_seen"])


def engine_dtypes() -> dict[str, str]:
    """The dtype each engine runs in: the one its users would choose on this CPU.

    With native bf16 (oneDNN's bf16 kernels; ONEDNN_MAX_CPU_ISA=AVX2 turns them off) both run the
    checkpoint's bf16. Without it, torch computes bf16 GEMMs and convolutions in scalar loops
    (~500x slower), so transformers' Janus runs in float32; janusvl keeps bf16, whose layers
    compute those calls in fp32 (models/layers.py) and which measured faster than its float32
    there (README, Performance).
    """
    from .models import layers

    return {"janusvl": "bfloat16", "transformers": "bfloat16" if layers.native_bf16() else "float32"}


def _timed(fn: Any) -> float:
    t = _now()
    fn()
    return _now() - t


def model_costs(ckpt: Path) -> dict[str, float]:
    """Bytes read per decoded token, FLOPs of the vision tower and of a prefill, weight bytes."""
    from .config import JanusConfig

    cfg = JanusConfig.from_file(ckpt / "config.json")
    lc, vc = cfg.language_config, cfg.vision_config
    kv = lc.num_key_value_heads * lc.head_dim
    layer = lc.hidden_size * (2 * lc.hidden_size + 2 * kv) + 3 * lc.hidden_size * lc.intermediate_size
    decoder_params = lc.num_hidden_layers * layer + lc.vocab_size * lc.hidden_size  # + lm_head
    spec = vc.spec
    vit_params = vc.num_blocks * (4 * spec.width ** 2 + 2 * spec.width * spec.mlp_hidden)
    aligner = cfg.aligner_config.input_dim * lc.hidden_size + lc.hidden_size ** 2
    return {
        "bytes_per_token": decoder_params * 2,  # bf16
        "vision_flops": 2 * vc.num_patches * (vit_params + aligner),
        "prefill_flops_per_token": 2 * lc.num_hidden_layers * layer,
        "weight_bytes": sum(f.stat().st_size for f in ckpt.iterdir() if f.suffix in (".safetensors", ".bin")),
    }


# ---------------------------------------------------------------- workers (one engine per process)

def _inputs(processor: Any, batch: int) -> Any:
    image = test_image()
    conv = [{"role": _user_role(processor), "content": "<image_placeholder>\n" + QUESTION, "images": [image]},
            {"role": _assistant_role(processor), "content": ""}]
    return processor.batchify([processor.process_one(conversations=conv, images=[image])] * batch)


def _user_role(processor: Any) -> str:
    from .messages import detect_roles

    return detect_roles(processor.tokenizer)[0]


def _assistant_role(processor: Any) -> str:
    from .messages import detect_roles

    return detect_roles(processor.tokenizer)[1]


def _load_janusvl(ckpt: Path, opts: dict[str, Any]) -> tuple[Any, Any, float]:
    from .models.fast import optimize, optimize_generation
    from .models.janus import MultiModalityCausalLM
    from .processing import VLChatProcessor

    t = _now()
    model = MultiModalityCausalLM.from_pretrained(ckpt, device="cpu", dtype=opts["dtype"])
    processor = VLChatProcessor.from_pretrained(ckpt)
    optimize(model.language_model, opts.get("quantize"))
    optimize_generation(model.gen_head, model.gen_aligner)
    return model, processor, _now() - t


def run_load(ckpt: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """Load only: the figure for a second checkpoint layout."""
    load_s = _load_janusvl(ckpt, opts)[2]
    return {"load_s": load_s, "peak_rss_gb": _rss_gb()}


def run_janusvl(ckpt: Path, opts: dict[str, Any]) -> dict[str, Any]:
    from .generation.image import decode_image_tokens, generate_images, image_grid
    from .generation.text import generate_tokens

    out: dict[str, Any] = {}
    model, processor, out["load_s"] = _load_janusvl(ckpt, opts)
    out["dtype"] = _dtype_name(model.dtype)
    out["kernel"] = model.language_model.kernel
    t = _now()
    inputs = _inputs(processor, 1)
    out["preprocess_ms"] = (_now() - t) * 1e3
    with torch.inference_mode():
        model.prepare_inputs_embeds(**inputs)  # warm-up: first touches of the weights
        t = _now()
        model.prepare_inputs_embeds(**inputs)
        out["vision_s"] = _now() - t
        out["prompt_tokens"] = int(inputs.input_ids.shape[1])
        t = _now()  # time to first token: vision encode, fusion, prefill, first sample
        e = model.prepare_inputs_embeds(**inputs)
        for batch in (1, 8):  # batch 8 repeats the prompt: only its decode is timed, so one image encode
            stamps = [_now() for _ in generate_tokens(model.language_model, e.expand(batch, -1, -1),
                                                     inputs.attention_mask.expand(batch, -1),
                                                     opts["new_tokens"] + 1, None)]
            if batch == 1:
                out["ttft_s"] = stamps[0] - t
            out[f"decode_tps_b{batch}"] = batch * opts["new_tokens"] / (stamps[-1] - stamps[0])
        if opts["image_batches"]:  # warm-up: first touches of the generation head and VQ decoder
            model.gen_head(e[:1, -1])
            decode_image_tokens(model, torch.zeros(1, image_grid(model) ** 2, dtype=torch.long))
        for n in opts["image_batches"]:
            t = _now()
            generate_images(model, processor, IMAGE_PROMPT, n=n, seed=0)
            out[f"image_s_n{n}"] = (_now() - t) / n
    out["peak_rss_gb"] = _rss_gb()
    return out


def run_transformers(ckpt: Path, opts: dict[str, Any]) -> dict[str, Any]:
    from transformers import JanusForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

    class _StepClock(StoppingCriteria):
        """Called once per generated token, right after it is chosen: the same stamps janusvl's
        loop gives."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            self.times.append(_now())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    from .processing import VLChatProcessor

    out: dict[str, Any] = {}
    hf_dir, dtype = Path(opts["hf_dir"]), getattr(torch, opts["dtype"])
    t = _now()
    model = JanusForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).eval()
    out["load_s"] = _now() - t
    out["dtype"] = _dtype_name(model.dtype)
    processor = VLChatProcessor.from_pretrained(ckpt)  # same ids and pixels for both engines
    inputs = _inputs(processor, 1)
    tok = processor.tokenizer
    common = dict(generation_mode="text", do_sample=False, pad_token_id=tok.eos_token_id,
                  eos_token_id=None, bos_token_id=tok.bos_token_id)
    with torch.inference_mode():
        pix = inputs.pixel_values[0].to(dtype)
        model.model.get_image_features(pix)
        t = _now()
        model.model.get_image_features(pix)
        out["vision_s"] = _now() - t
        for batch in (1, 8):
            b = inputs if batch == 1 else _inputs(processor, batch)
            stamps = _StepClock()
            t = _now()
            model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           pixel_values=b.pixel_values[:, 0].to(dtype), **common,
                           max_new_tokens=opts["new_tokens"] + 1, min_new_tokens=opts["new_tokens"] + 1,
                           stopping_criteria=StoppingCriteriaList([stamps]))
            if batch == 1:
                out["ttft_s"] = stamps.times[0] - t
            out[f"decode_tps_b{batch}"] = batch * (len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0])
        from .generation.image import image_prompt

        from transformers import GenerationConfig

        ids = torch.tensor([tok.encode(image_prompt(processor, IMAGE_PROMPT))])
        if opts["image_batches"]:
            codes = torch.zeros(1, model.config.vision_config.num_image_tokens, dtype=torch.long)
            model.model.vqmodel.decode(codes)  # warm-up, as for janusvl
        for n in opts["image_batches"]:
            config = GenerationConfig(
                do_sample=True, guidance_scale=5.0, num_return_sequences=n, bos_token_id=tok.bos_token_id,
                pad_token_id=processor.pad_id, generation_kwargs={"boi_token_id": processor.image_start_id})
            t = _now()
            codes = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                   generation_config=config)
            model.decode_image_tokens(codes)
            out[f"image_s_n{n}"] = (_now() - t) / n
    out["peak_rss_gb"] = _rss_gb()
    return out


def _worker(engine: str, ckpt: str, opts_json: str) -> None:
    opts = json.loads(opts_json)
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    run = {"janusvl": run_janusvl, "transformers": run_transformers, "load": run_load}[engine]
    print("RESULT " + json.dumps(run(Path(ckpt), opts)), flush=True)


def _spawn(engine: str, ckpt: Path, opts: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "janusvl.benchmark", engine, str(ckpt), json.dumps(opts)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}


# ---------------------------------------------------------------- report

ROWS = [  # key, label, unit, higher is better
    ("load_s", "load", "s", False),
    ("load_bin_s", "load from pytorch_model.bin", "s", False),
    ("preprocess_ms", "preprocessing", "ms", False),
    ("vision_s", "vision encode + align", "s", False),
    ("ttft_s", "time to first token", "s", False),
    ("decode_tps_b1", "decode, batch 1", "tok/s", True),
    ("decode_tps_b8", "decode, batch 8 (aggregate)", "tok/s", True),
    ("image_s_n1", "image generation, n=1", "s/image", False),
    ("image_s_n4", "image generation, n=4", "s/image", False),
    ("peak_rss_gb", "peak RSS", "GB", False),
    ("peak_rss_bin_gb", "peak RSS, loading the .bin", "GB", False),
]


def bounds_for(results: dict[str, Any], costs: dict[str, float], machine: dict[str, float]) -> dict[str, float]:
    """The best each figure could be on this machine (time figures: lower bounds; rates: upper)."""
    gflops, bw = machine["gemm_gflops"] * 1e9, machine["bandwidth_gbs"] * 1e9
    prompt = results.get("prompt_tokens", 0)
    vision = costs["vision_flops"] / gflops
    return {
        "vision_s": vision,
        "ttft_s": vision + prompt * costs["prefill_flops_per_token"] / gflops,
        "decode_tps_b1": bw / costs["bytes_per_token"],
        "peak_rss_gb": costs["weight_bytes"] / 1e9,
        "peak_rss_bin_gb": costs["weight_bytes"] / 1e9,
    }


def format_table(report: dict[str, Any]) -> str:
    ours, theirs, bounds = report["janusvl"], report.get("transformers") or {}, report["bounds"]
    lines = [f"{'figure':32} {'janusvl':>12} {'transformers':>13} {'ratio':>7} {'bound':>10} {'of bound':>9}",
             f"{'dtype':32} {ours.get('dtype', '-'):>12} {theirs.get('dtype', '-'):>13}",
             f"{'decoder kernel':32} {ours.get('kernel', '-'):>12} {'torch':>13}"]
    for key, label, unit, higher in ROWS:
        a, b, bound = ours.get(key), theirs.get(key), bounds.get(key)
        if a is None:
            continue
        ratio = ""
        if isinstance(b, (int, float)) and b and a:
            ratio = f"{(a / b if higher else b / a):.2f}x"
        frac = ""
        if bound:
            frac = f"{(a / bound if higher else bound / a) * 100:.0f}%"
        lines.append(f"{label + ' (' + unit + ')':32} {a:12.3f} {b if isinstance(b, str) else (f'{b:.3f}' if b is not None else '-'):>13} "
                     f"{ratio:>7} {(f'{bound:.3f}' if bound else ''):>10} {frac:>9}")
    m = report["machine"]
    cpu_class = "native bf16" if m["native_bf16"] else "no native bf16 (bf16 GEMMs emulated)"
    seen = m["bandwidth_gbs_seen"]
    lines.append(f"machine: {m['cpu']}, {cpu_class}, {m['threads']} threads; memory read {m['bandwidth_gbs']:.1f} GB/s, "
                 f"{m['gemm_dtype']} GEMM {m['gemm_gflops']:.0f} GFLOP/s (best of {len(seen)} measurements in the run; "
                 f"read {min(seen):.1f}-{max(seen):.1f} GB/s); torch {m['torch']}")
    lines.append("ratio: how many times faster (or smaller) janusvl is; of bound: janusvl's figure as a share of the "
                 "machine's limit")
    if "error" in theirs:
        lines.append(f"transformers failed: {theirs['error']}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def default_checkpoint(layout: str = "safetensors", progress: bool = True) -> Path:
    """A Janus-Pro-1B-shaped random bf16 checkpoint, written once into the user cache."""
    from .testing.checkpoint import write_checkpoint

    name = "bench-pro-1b" if layout == "safetensors" else f"bench-pro-1b-{layout}"
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "janusvl" / name
    if not (root / "config.json").is_file():
        if progress:
            print(f"writing a Janus-Pro-1B-sized random checkpoint ({layout}) to {root} (4.2 GB, about a minute)",
                  file=sys.stderr)
        tmp = root.with_name(root.name + ".partial")
        write_checkpoint(tmp, size="pro-1b", layout=layout, dtype=torch.bfloat16)
        tmp.rename(root)
    return root


def run(model: str | None, threads: int = 2, new_tokens: int = 32, images: bool = True,
        transformers: bool = True, quantize: str | None = None) -> dict[str, Any]:
    from .config import JanusConfig
    from .loading.hub import resolve_checkpoint
    from .loading.quantized import resolve_quantize

    ckpt = resolve_checkpoint(model) if model else default_checkpoint()
    stored = JanusConfig.from_file(ckpt / "config.json").quantization_config
    quantize = resolve_quantize(ckpt, stored and stored.scheme, quantize)  # a pre-quantised checkpoint's own
    machine = {"cpu": _cpu_name(), "threads": threads, "torch": torch.__version__, **machine_bounds(threads)}
    opts = {"threads": threads, "new_tokens": new_tokens, "image_batches": [1, 4] if images else [],
            "quantize": quantize}
    costs = model_costs(ckpt)
    if quantize == "int8":  # one byte per decoder weight: the decode bound doubles
        costs["bytes_per_token"] /= 2
    elif quantize == "int4":  # half a byte per weight, plus a bf16 scale and offset per 64
        costs["bytes_per_token"] *= (0.5 + 4 / 64) / 2
    report: dict[str, Any] = {"checkpoint": str(ckpt), "machine": machine, "options": opts}
    dtypes = engine_dtypes()
    print(f"running janusvl ({dtypes['janusvl']}) ...", file=sys.stderr)
    report["janusvl"] = _spawn("janusvl", ckpt, {**opts, "dtype": dtypes["janusvl"]})
    remeasure(machine)
    if "error" in report["janusvl"]:
        raise RuntimeError(f"janusvl benchmark failed: {report['janusvl']['error']}")
    if model is None:  # the .bin release layout too: its load is the slow one
        loaded = _spawn("load", default_checkpoint("bin"), {**opts, "dtype": dtypes["janusvl"]})
        if "error" in loaded:
            raise RuntimeError(f"janusvl benchmark failed loading pytorch_model.bin: {loaded['error']}")
        report["janusvl"]["load_bin_s"] = loaded["load_s"]
        report["janusvl"]["peak_rss_bin_gb"] = loaded["peak_rss_gb"]
    if transformers and stored is not None:
        report["transformers"] = {"error": f"the checkpoint is stored quantised ({stored.scheme}) by janusvl, "
                                           "which transformers cannot load"}
    elif transformers:
        report["transformers"] = _with_transformers(ckpt, {**opts, "dtype": dtypes["transformers"]})
        remeasure(machine)
    report["bounds"] = bounds_for(report["janusvl"], costs, machine)
    return report


def _with_transformers(ckpt: Path, opts: dict[str, Any]) -> dict[str, Any]:
    if importlib.util.find_spec("transformers") is None:  # importing it here would cost seconds
        return {"error": "transformers is not installed (pip install 'janusvl[hf]')"}
    from .loading.convert import convert_checkpoint

    with tempfile.TemporaryDirectory(prefix="janusvl-bench-hf-") as tmp:
        print("writing the checkpoint in transformers' layout ...", file=sys.stderr)
        hf_dir = convert_checkpoint(ckpt, Path(tmp) / "hf", to="hf")
        print(f"running transformers ({opts['dtype']}) ...", file=sys.stderr)
        return _spawn("transformers", ckpt, {**opts, "hf_dir": str(hf_dir)})


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
