"""Parity with transformers' Janus (weights through our loader): vision features, fused
embeddings and last-token logits for the image shapes and conversation kinds users send, in fp32,
in bf16 (the published checkpoints' dtype) and with grouped-query attention."""

from __future__ import annotations

import pytest
import torch
from transformers import JanusImageProcessorPil

from conftest import BF16_BOUND, assert_bf16_close, hf_embeds, make_image, to_transformers
from janusvl import MultiModalityCausalLM, load_pretrained_model

PRO = ("<|User|>", "<|Assistant|>")


def user(text: str, images: list | None = None) -> dict:
    return {"role": PRO[0], "content": text, "images": images or []}


def assistant(text: str = "") -> dict:
    return {"role": PRO[1], "content": text}


CASES = {
    "wide": [user("<image_placeholder>\nDescribe this image.", [make_image(640, 480, seed=1)]), assistant()],
    "tall": [user("<image_placeholder>\nWhat is tall here?", [make_image(300, 700, seed=2)]), assistant()],
    "tiny": [user("<image_placeholder>\nSmall.", [make_image(40, 7, seed=3)]), assistant()],
    "grayscale": [user("<image_placeholder>\nGrey?", [make_image(200, 150, "L", seed=4)]), assistant()],
    "rgba": [user("<image_placeholder>\nAlpha?", [make_image(160, 120, "RGBA", seed=5)]), assistant()],
    "two_images": [user("Compare <image_placeholder> and <image_placeholder> please.",
                        [make_image(320, 240, seed=6), make_image(128, 256, seed=7)]), assistant()],
    "multi_turn": [user("<image_placeholder>\nWhat is this?", [make_image(256, 256, seed=8)]),
                   assistant("A test pattern."),
                   user("<image_placeholder>\nAnd this one?", [make_image(500, 200, seed=9)]), assistant()],
    "text_only": [user("Tell me a story about a café in 日本."), assistant()],
}


def last_logits_hf(hf, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Padding-aware positions, as transformers' generate builds them for left-padded batches.
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return hf(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]


def check_case(tiny, hf_model, conversations: list[list[dict]]) -> None:
    _, processor, model = tiny
    outs = [processor.process_one(conversations=c, images=[i for m in c for i in m.get("images", [])])
            for c in conversations]
    batch = processor.batchify(outs)
    with torch.no_grad():
        ours = model.prepare_inputs_embeds(**batch)
        theirs = hf_embeds(hf_model, processor, batch)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
        mask = batch.attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        got = model.language_model(inputs_embeds=ours, attention_mask=mask, position_ids=positions).logits[:, -1]
        want = last_logits_hf(hf_model, theirs, mask)
    diff = (got - want).abs().max().item()
    assert diff < 5e-5 * max(1.0, want.abs().max().item()), diff
    # the answer must not depend on which implementation ranks the tokens
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("name", list(CASES))
def test_single_conversation_matches_transformers(tiny, hf_model, name: str) -> None:
    check_case(tiny, hf_model, [CASES[name]])


def test_left_padded_batch_matches_transformers(tiny, hf_model) -> None:
    check_case(tiny, hf_model, [CASES["text_only"], CASES["two_images"], CASES["tiny"], CASES["multi_turn"]])


def test_batched_rows_equal_single_rows(tiny) -> None:
    """Left padding must not change a row's logits: the batch equals each conversation alone."""
    _, processor, model = tiny
    convs = [CASES["text_only"], CASES["wide"], CASES["two_images"]]
    outs = [processor.process_one(conversations=c, images=[i for m in c for i in m.get("images", [])])
            for c in convs]
    batch = processor.batchify(outs)
    with torch.no_grad():
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        together = model.language_model(inputs_embeds=model.prepare_inputs_embeds(**batch),
                                        attention_mask=batch.attention_mask, position_ids=positions).logits[:, -1]
        for row, out in enumerate(outs):
            alone = processor.batchify([out])
            single = model.language_model(inputs_embeds=model.prepare_inputs_embeds(**alone),
                                          attention_mask=alone.attention_mask).logits[:, -1]
            torch.testing.assert_close(together[row : row + 1], single, rtol=0, atol=2e-5)


def test_vision_features_match_transformers(tiny, hf_model) -> None:
    _, processor, model = tiny
    images = [make_image(640, 480, seed=11), make_image(40, 7, seed=12), make_image(90, 300, "L", seed=13)]
    pixels = processor.image_processor(images).pixel_values
    oracle = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_size=14)
    # pixel values are bit-exact where both resize to the same size (see test_processing for the rest)
    torch.testing.assert_close(pixels[:1], oracle(images[:1], return_tensors="pt").pixel_values, rtol=0, atol=0)
    with torch.no_grad():
        ours = model.vision_model(pixels)
        theirs = hf_model.model.vision_model(pixels).last_hidden_state
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.aligner(ours), hf_model.model.aligner(theirs), rtol=0, atol=1e-5)


def test_prepare_inputs_embeds_leaves_inputs_alone_and_checks_masks(tiny) -> None:
    _, processor, model = tiny
    batch = processor(conversations=CASES["wide"], images=CASES["wide"][0]["images"])
    before = {k: batch[k].clone() for k in ("input_ids", "images_seq_mask", "images_emb_mask", "pixel_values")}
    model.prepare_inputs_embeds(**batch)
    for key, value in before.items():
        assert torch.equal(batch[key], value), key
    bad = batch.images_seq_mask.clone()
    bad[0, bad[0].nonzero()[0, 0]] = False
    from janusvl import InputError
    with pytest.raises(InputError, match="575 image positions.*576 image embeddings"):
        model.prepare_inputs_embeds(batch.input_ids, batch.pixel_values, bad, batch.images_emb_mask)




def test_bf16_matches_transformers_in_bf16(tiny_dir, bf16_oracle) -> None:
    """Loaded in bf16 (the path on this CPU, whichever kernels it selects), image rows and
    last-token logits are as close to fp32 as transformers' Janus in bf16 is, and pick its token."""
    inputs, hf = bf16_oracle
    model = MultiModalityCausalLM.from_pretrained(tiny_dir, device="cpu", dtype="bfloat16")
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(**inputs)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits[:, -1]
    assert embeds.dtype == logits.dtype == torch.bfloat16
    image = inputs.images_seq_mask
    (fp32_embeds, fp32_logits), (bf16_embeds, bf16_logits) = hf[torch.float32], hf[torch.bfloat16]
    assert torch.equal(embeds[~image], bf16_embeds[~image])  # text rows: the same bf16 embedding rows
    assert_bf16_close(embeds[image], bf16_embeds[image], fp32_embeds[image], BF16_BOUND)
    assert_bf16_close(logits, bf16_logits, fp32_logits, BF16_BOUND)
    assert torch.equal(logits.argmax(-1), fp32_logits.argmax(-1))


def test_grouped_query_attention_matches_transformers(gqa_dir) -> None:
    """A decoder with fewer KV heads than heads: logits of a left-padded batch and greedy tokens."""
    tokenizer, processor, model = load_pretrained_model(gqa_dir, device="cpu", dtype="float32")
    cfg = model.config.language_config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert model.language_model.model.layers[0].self_attn.k_proj.weight.shape == (2 * cfg.head_dim, cfg.hidden_size)
    hf = to_transformers(model, processor)
    check_case((tokenizer, processor, model), hf, [CASES["text_only"], CASES["tiny"]])
    batch = processor.batchify([processor.process_one(conversations=CASES["text_only"])])
    kwargs = dict(attention_mask=batch.attention_mask, eos_token_id=None, max_new_tokens=16, do_sample=False)
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**batch)
        ours = model.language_model.generate(inputs_embeds=embeds, **kwargs)
        theirs = hf.generate(inputs_embeds=embeds, generation_mode="text", **kwargs)
    assert torch.equal(ours, theirs) and len(set(ours[0].tolist())) > 5
