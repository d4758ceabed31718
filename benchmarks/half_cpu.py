"""float16 beside bfloat16 (and float32) on this CPU: each stage of both pipelines, short runs.

    python benchmarks/half_cpu.py [MODEL ...] [--dtypes bfloat16 float16 float32] [--threads 2]

With no MODEL it measures a tiny random checkpoint (written to a temporary directory) and the
Janus-Pro-1B-sized random checkpoint that `janusvl bench` writes to ~/.cache/janusvl. Stages:
load; vision tower + aligner on one 640x480 image; prefill of a short text prompt; decoding
(4 steps after a first, batch 1); image-generation steps (CFG, one image: 2 rows, 4 steps after
a first); VQ decoding of one 384x384 image. Weights are cast to each dtype at load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from janusvl import MultiModalityCausalLM, VLChatProcessor
from janusvl.benchmark import default_checkpoint, test_image
from janusvl.generation.image import cfg_input_ids, image_prompt, image_token_steps, multinomial_sampler
from janusvl.generation.text import generate_tokens
from janusvl.models.layers import emulated

PROMPT = "Describe a lighthouse on a cliff at sunset in a few words."
DECODE_STEPS = 4


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def measure(ckpt: Path, dtype: torch.dtype) -> dict[str, float]:
    processor = VLChatProcessor.from_pretrained(ckpt)
    out: dict[str, float] = {}
    holder: list[MultiModalityCausalLM] = []
    out["load (s)"] = timed(lambda: holder.append(MultiModalityCausalLM.from_pretrained(ckpt, dtype=dtype)))
    model = holder[0]
    pixels = processor.image_processor([test_image()]).pixel_values.to(dtype)
    out["vision + aligner, 1 image (s)"] = timed(lambda: model.encode_images(pixels))
    conv = [{"role": "<|User|>", "content": PROMPT}, {"role": "<|Assistant|>", "content": ""}]
    batch = processor(conversations=conv)
    embeds = model.language_model.get_input_embeddings()(batch.input_ids)
    steps = generate_tokens(model.language_model, embeds, batch.attention_mask, DECODE_STEPS + 2, None)
    out["prefill, %d tokens (s)" % embeds.shape[1]] = timed(lambda: next(steps))
    next(steps)  # the first decode step sets up kernels for its shapes: not timed
    out["decode, batch 1 (tok/s)"] = DECODE_STEPS / timed(lambda: [None for _ in steps])
    ids = cfg_input_ids(processor.tokenizer.encode(image_prompt(processor, PROMPT)), 1, processor.pad_id)
    gen = image_token_steps(model, ids, 5.0, multinomial_sampler(1.0, None), DECODE_STEPS + 2)
    next(gen), next(gen)  # the prompt, and the first step (kernel set-up): not timed
    out["image-generation step, n=1 (s)"] = timed(lambda: [None for _ in gen]) / DECODE_STEPS
    codes = torch.randint(0, 16384, (1, 576), generator=torch.Generator().manual_seed(0))
    out["VQ decode, 1 image (s)"] = timed(lambda: model.gen_vision_model.decode_code(codes, shape=[1, 8, 24, 24]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="checkpoint directories (default: tiny and Pro-1B-sized)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        models = [Path(m) for m in args.models]
        if not models:
            from janusvl.testing.checkpoint import write_checkpoint

            models = [write_checkpoint(Path(tmp) / "tiny", dtype=torch.bfloat16), default_checkpoint()]
        for ckpt in models:
            results = {name: measure(ckpt, getattr(torch, name)) for name in args.dtypes}
            print(f"\n{ckpt} ({args.threads} threads; emulated on this CPU: "
                  f"{[n for n in args.dtypes if emulated(torch.empty(0, dtype=getattr(torch, n)))]})")
            print(f"{'stage':36}" + "".join(f"{n:>12}" for n in args.dtypes))
            for stage in results[args.dtypes[0]]:
                print(f"{stage:36}" + "".join(f"{results[n][stage]:12.3f}" for n in args.dtypes))


if __name__ == "__main__":
    main()
