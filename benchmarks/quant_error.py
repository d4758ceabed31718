"""Relative error of int8 and int4 last-token logits against bf16, on any checkpoint.

    python benchmarks/quant_error.py [MODEL]

With no MODEL it uses the Janus-Pro-1B-sized random checkpoint that `janusvl bench` writes. Two
prompts: the benchmark's image + question (prefill path: more than 128 rows, so the weights' error
alone on AVX2; int8 weights x bf16 activations where bf16 is native) and the same batch decoding
8 further tokens (decode path: 8 rows, activations quantised per block too: janusvl's integer
kernels on AVX2, fbgemm's dynamic int8 kernel where bf16 is native). The error is the relative L2
norm ||q - bf16|| / ||bf16|| of the last-token logits, as in tests/test_fast.py and the README.
"""

from __future__ import annotations

import sys

import torch

from janusvl import MultiModalityCausalLM, VLChatProcessor
from janusvl.benchmark import _inputs, default_checkpoint
from janusvl.generation.text import generate
from janusvl.models.fast import optimize


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / a.float().norm()).item()


def main(model: str | None) -> None:
    torch.set_num_threads(2)
    ckpt = model or default_checkpoint()
    processor = VLChatProcessor.from_pretrained(ckpt)
    inputs = _inputs(processor, 1)
    logits = {}
    for quantize in (None, "int8", "int4"):
        vl = MultiModalityCausalLM.from_pretrained(ckpt, device="cpu", dtype="bfloat16")
        optimize(vl.language_model, quantize)
        with torch.inference_mode():
            embeds = vl.prepare_inputs_embeds(**inputs)
            lm = vl.language_model
            prefill = lm(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits[:, -1]
            # decode path: greedy continuation under bf16 ids, so both engines see the same tokens
            ids = logits.get("ids")
            if ids is None:
                ids = generate(lm, embeds, attention_mask=inputs.attention_mask, eos_token_id=None, max_new_tokens=8)
                logits["ids"] = ids
            full = torch.cat([embeds, lm.get_input_embeddings()(ids)], 1)
            mask = torch.ones(full.shape[:2], dtype=torch.long)
            out = lm.model(inputs_embeds=full[:, :-8], attention_mask=mask[:, :-8], use_cache=True)
            step = lm(inputs_embeds=full[:, -8:], attention_mask=mask, past_key_values=out.past_key_values).logits
        logits[quantize] = (prefill, step[:, -1])
        del vl
    print(f"checkpoint: {ckpt}")
    for quantize in ("int8", "int4"):
        print(f"{quantize} vs bf16 last-token logits, relative L2 error: "
              f"prefill {relative(logits[None][0], logits[quantize][0]):.4f}, "
              f"decode (8-token step) {relative(logits[None][1], logits[quantize][1]):.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
