"""A tiny Janus-shaped tokenizer and processor configs for tests.

`write_tokenizer` trains a small byte-level BPE (deterministic, a few milliseconds) and writes the
three tokenizer files a Janus checkpoint carries, with the Janus added tokens after the base
vocabulary as in the real releases. transformers' AutoTokenizer loads the result like a real one.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"

# In the order Janus adds them (after BOS, EOS, pad); ids are always looked up, never assumed.
JANUS_TOKENS = [
    "<begin_of_image>", "<end_of_image>", "<image_placeholder>", "<patch_placeholder>",
    "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
]
PRO_ROLE_TOKENS = ["<|User|>", "<|Assistant|>"]

_SUBJECTS = ["the cat", "a small dog", "two people", "the red car", "an old man", "this picture",
             "the green tree", "a young woman", "the blue sky", "three birds"]
_VERBS = ["is sitting on", "looks at", "stands near", "walks across", "is painted with",
          "shows", "describes", "contains", "is next to", "holds"]
_OBJECTS = ["the wooden table.", "a bright window.", "the busy street.", "some colorful flowers.",
            "a white wall.", "the sandy beach.", "a large building.", "the open door.",
            "a cup of coffee.", "the mountain road."]
_EXTRA = [
    "You are a helpful language and vision assistant.",
    "Describe this image in detail. What is in the picture? Please answer the question.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "café crème brûlée naïve résumé Grüße über façade",
    "日本語のテキストです。日本語 中文 汉字",
    "emoji 😀 🎉 👍 ❤️ and symbols → ≤ ≥ ±",
]


def _corpus() -> list[str]:
    sentences = [f"{s.capitalize()} {v} {o}" for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)]
    # Multi-byte lines repeated so that some of them merge into whole tokens; characters that
    # appear only in tests stay split into several byte tokens.
    return sentences + _EXTRA * 3


def build_tokenizer(roles: str = "pro", vocab_size: int = 1000) -> Tokenizer:
    """The trained tokenizer with Janus's added tokens and a BOS-adding post-processor."""
    if roles not in ("pro", "1.3b"):
        raise ValueError(f"roles must be 'pro' (<|User|>, <|Assistant|> tokens) or '1.3b', got {roles!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    added = [BOS, EOS, PAD, *JANUS_TOKENS, *(PRO_ROLE_TOKENS if roles == "pro" else [])]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    # Like the released tokenizer.json: the template puts BOS in front.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def write_tokenizer(dst: Path, roles: str = "pro") -> int:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into `dst`.

    Returns the vocabulary size including added tokens: a test model's vocab_size must be >= it.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(roles)
    tok.save(str(dst / "tokenizer.json"))
    extra = JANUS_TOKENS[2:] + (PRO_ROLE_TOKENS if roles == "pro" else [])
    _write_json(dst / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
    })
    _write_json(dst / "special_tokens_map.json", {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": extra,
    })
    return tok.get_vocab_size(with_added_tokens=True)


def write_processor_configs(dst: Path, image_size: int = 384) -> None:
    """preprocessor_config.json and processor_config.json with the released Janus values (for
    another `image_size`, the image token count of a 16-pixel patch grid)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _write_json(dst / "preprocessor_config.json", {
        "image_processor_type": "VLMImageProcessor",
        "image_size": image_size,
        "min_size": 14,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "processor_class": "VLChatProcessor",
    })
    _write_json(dst / "processor_config.json", {
        "image_tag": "<image_placeholder>",
        "num_image_tokens": (image_size // 16) ** 2,
        "add_special_token": False,
        "sft_format": "deepseek",
        "mask_prompt": True,
        "ignore_id": -100,
        "processor_class": "VLChatProcessor",
    })
