"""The hostile corpus for the library and the CLI, as data: each case is an input and the error it
must get (a `janusvl.errors` type and a message pattern for the library; an exit status and a
stderr pattern for the CLI), or, for an odd but valid input, a check of what it returns.
The server's part is tests/hostile_http.py. Inputs are built on the fly (a few KB each).

`tests/test_hostile_corpus.py` runs these under pytest; `python tests/hostile_report.py` runs
them, and the server's, without it."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hostile_http import image_payloads, png
from hostile_report import CASE_SECONDS, Outcome, run_cli, run_cli_process
from janusvl import CheckpointError, ConfigError, ImageLoadError, ImageTooLargeError, InputError, JanusConfig
from janusvl.errors import ContextLengthError, JanusError
from janusvl.testing.checkpoint import config_dict


@dataclass
class World:
    """What the cases act on: the API over a tiny model, its checkpoint, a scratch folder."""

    janus: Any
    tiny_dir: Path
    scratch: Path

    def __post_init__(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)

    @cached_property
    def engine(self) -> Any:
        from janusvl.engine import Engine

        return Engine(self.janus)  # never started: only its request builders are used

    @cached_property
    def embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.janus.processor(prompt="Hi")
        return self.janus.model.prepare_inputs_embeds(**batch), batch.attention_mask

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.scratch / name
        if not path.exists():
            path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    @cached_property
    def fifo(self) -> Path:
        path = self.scratch / "fifo.png"
        os.mkfifo(path)
        return path

    def checkpoint(self, name: str, edit: Callable[[Path], None]) -> Path:
        """A copy of the tiny checkpoint (weights hard-linked, not copied) after `edit(root)`."""
        root = self.scratch / name
        if not root.exists():
            root.mkdir()
            for f in self.tiny_dir.iterdir():
                os.link(f, root / f.name) if f.suffix == ".safetensors" else shutil.copy(f, root / f.name)
            edit(root)
        return root


@dataclass(frozen=True)
class LibCase:
    name: str
    group: str
    call: Callable[[World], Any]
    error: type[JanusError] | None  # None: an odd but valid input, served
    pattern: str = ""  # re.search on the message
    check: Callable[[Any], bool] = lambda value: True  # what a served case must return
    seconds: float = CASE_SECONDS  # longer is a hang


@dataclass(frozen=True)
class CliCase:
    name: str
    group: str
    argv: tuple[str, ...]  # "{tiny}" is the tiny checkpoint, "{scratch}" the scratch folder
    exit: int
    pattern: str  # re.search on stderr
    absent: tuple[str, ...] = ()  # text that must not be on stderr (e.g. "Loading": nothing loaded)
    prepare: Callable[[World], Any] = lambda world: None  # files the case reads


def starts(message: str) -> str:
    return "^" + re.escape(message)


def cli_starts(message: str) -> str:
    """stderr starts with `message` (CLI patterns are multi-line, where "^" starts any line)."""
    return r"\A" + re.escape(message)


# ---------------------------------------------------------------------- library: arguments

BAD_CHAT_ARGS: list[tuple[dict[str, Any], str]] = [
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": 1e-9}, "temperature must be 0 (greedy) or at least 1e-05"),
    ({"max_new_tokens": None}, "max_new_tokens must be an integer, got None"),
    ({"max_new_tokens": 2.9}, "max_new_tokens must be an integer, got 2.9"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, got True"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be an integer, got '5'"),
    ({"top_k": 2.7}, "top_k must be an integer, got 2.7"),
    ({"top_k": -1}, "top_k must be >= 0, got -1"),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
    ({"top_p": float("inf")}, "top_p must be a finite number"),
    ({"stop": 42}, "stop must be a string or a list of non-empty strings, got 42"),
    ({"stop": ["ok", ""]}, "stop must be a string or a list of non-empty strings; stop[1] is ''"),
    ({"stop": ["\ud800"]}, "stop[0] holds a lone surrogate"),
    ({"seed": 2**70}, f"seed must be at most {2**63 - 1}, got {2**70}"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
]

BAD_IMAGE_GENERATION_ARGS: list[tuple[dict[str, Any], str]] = [
    ({"n": 65}, "n must be at most 64, got 65"),
    ({"n": 10000}, "n must be at most 64, got 10000"),
    ({"cfg_weight": 1e30}, "cfg_weight must be in (0, 100], got 1e+30"),
    ({"cfg_weight": float("nan")}, "cfg_weight must be a finite number"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": 0}, "temperature must be at least 1e-05, got 0"),
    ({"seed": 2**64}, "seed must be at most"),
]


def _label(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _argument_cases() -> list[LibCase]:
    cases = []
    for kwargs, message in BAD_CHAT_ARGS:
        entry_points: dict[str, Callable[[World], Any]] = {
            "chat": lambda w, kw=kwargs: w.janus.chat("Hi", **kw),
            "chat_batch": lambda w, kw=kwargs: w.janus.chat_batch(["Hi", "Ho"], **kw),
            "Engine.chat_request": lambda w, kw=kwargs: w.engine.chat_request("Hi", **kw),
        }
        if kwargs == {"max_new_tokens": None}:  # the engine takes None: what the context leaves
            del entry_points["Engine.chat_request"]
        cases += [LibCase(f"{where}({_label(kwargs)})", "arguments", call, InputError, starts(message))
                  for where, call in entry_points.items()]
    for kwargs, message in BAD_IMAGE_GENERATION_ARGS:
        cases += [
            LibCase(f"generate_images({_label(kwargs)})", "image generation",
                    lambda w, kw=kwargs: w.janus.generate_images("a red cube", **kw), InputError, starts(message),
                    seconds=10),
            LibCase(f"Engine.image_request({_label(kwargs)})", "image generation",
                    lambda w, kw=kwargs: w.engine.image_request("a red cube", **kw), InputError, starts(message)),
        ]
    from janusvl.batch.jobs import Backend
    from janusvl.engine import Engine
    from janusvl.generation.image import decode_image_tokens
    from janusvl.generation.sampling import SamplingParams

    small = Image.new("RGB", (8, 8))

    def generate(w: World, **kwargs: Any) -> Any:
        embeds, mask = w.embeds
        return w.janus.model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    other: list[tuple[str, Callable[[World], Any], str]] = [
        ("caption_batch(batch_size=0)", lambda w: w.janus.caption_batch([small], batch_size=0),
         "^batch_size must be >= 1, got 0"),
        ("caption_batch(top_k=2.7)", lambda w: w.janus.caption_batch([small], top_k=2.7),
         "^top_k must be an integer, got 2.7"),
        ("caption_batch(color='red')", lambda w: w.janus.caption_batch([small], color="red"),
         "^color: caption_batch takes"),
        ("Engine.chat_request(n=True)", lambda w: w.engine.chat_request("Hi", n=True),
         "^n must be an integer, got True"),
        ("Engine(max_batch=True)", lambda w: Engine(w.janus, max_batch=True),
         "^max_batch must be an integer, got True"),
        ("SamplingParams(top_k=2.7)", lambda w: SamplingParams(temperature=1.0, top_k=2.7),
         "^top_k must be an integer, got 2.7"),
        ("generate(max_new_tokens=2.9)", lambda w: generate(w, max_new_tokens=2.9),
         "^max_new_tokens must be an integer, got 2.9"),
        ("generate(seed=2**64)", lambda w: generate(w, max_new_tokens=2, do_sample=True, seed=2**64),
         "^seed must be at most"),
        ("generate(eos_token_id=[1, 'x'])", lambda w: generate(w, max_new_tokens=1, eos_token_id=[1, "x"]),
         r"^eos_token_id\[1\] must be an integer, got 'x'"),
        ("generate(pad_token_id=2.5)", lambda w: generate(w, max_new_tokens=1, pad_token_id=2.5),
         "^pad_token_id must be an integer"),
        ("Backend('ray', replicas=True)", lambda w: Backend("ray", replicas=True),
         "^replicas must be an integer, got True"),
        ("Backend('ray', cpus_per_replica='2')", lambda w: Backend("ray", cpus_per_replica="2"),
         "^cpus_per_replica must be a number, got '2'"),
        ("tokenizer.decode([-1])", lambda w: w.janus.tokenizer.decode([-1]), r"^ids\[0\] must be >= 0, got -1"),
        ("tokenizer.decode([5, 2**40])", lambda w: w.janus.tokenizer.decode([5, 2**40]), r"^ids\[1\] must be at most"),
        ("tokenizer.decode([1.5])", lambda w: w.janus.tokenizer.decode([1.5]),
         r"^ids\[0\] must be an integer, got 1.5"),
        ("tokenizer.decode(None)", lambda w: w.janus.tokenizer.decode(None), "^decode takes a sequence"),
        ("processor.batchify([dict])", lambda w: w.janus.processor.batchify([{"input_ids": [1]}]),
         r"^outputs\[0\] is a dict, not a process_one output"),
        ("decode_image_tokens(code 16384)", lambda w: decode_image_tokens(w.janus.model, torch.full((1, 576), 16384)),
         r"^tokens must be code ids in 0\.\.16383"),
        ("decode_image_tokens(float codes)", lambda w: decode_image_tokens(w.janus.model, torch.zeros(1, 576)),
         "^tokens must be integer code ids, got torch.float32"),
    ]
    cases += [LibCase(name, "arguments", call, InputError, pattern) for name, call, pattern in other]
    cases.append(LibCase("chat(numpy integers for ints and floats)", "arguments",
                         lambda w: (w.janus.chat("Hi", max_new_tokens=np.int64(3), temperature=1, top_k=np.int32(5),
                                                 seed=np.uint8(7)), w.janus.chat("Hi", max_new_tokens=3,
                                                                                 temperature=1.0, top_k=5, seed=7)),
                         None, check=lambda pair: pair[0] == pair[1]))
    return cases


# ---------------------------------------------------------------------- library: text and messages

def _text_cases() -> list[LibCase]:
    from janusvl.processing.processor import load_pil_images

    surrogates: list[tuple[str, Callable[[World], Any]]] = [
        ("messages[0].content", lambda w: w.janus.chat("caf\ud800")),
        ("messages[0].content[0].text",
         lambda w: w.janus.chat([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}])),
        ("prompt", lambda w: w.janus.processor(prompt="a\ud83d")),
        ("the text to encode", lambda w: w.janus.tokenizer.encode("\ud800")),
        ("conversations[0]['content']", lambda w: w.janus.processor.apply_sft_template_for_multi_turn_prompts(
            [{"role": "<|User|>", "content": "\ud800"}])),
        ("prompt", lambda w: w.janus.generate_images("a \udc80 cat")),
    ]
    cases = [LibCase(f"lone surrogate in {where} ({i})", "text", call, InputError,
                     starts(f"{where} holds a lone surrogate")) for i, (where, call) in enumerate(surrogates)]
    deepseek = {"role": "<|User|>", "content": "<image_placeholder>\nWhat is it?", "images": "x.png"}
    answer = {"role": "<|Assistant|>", "content": ""}
    cases += [
        LibCase("chat: DeepSeek images as one string", "messages", lambda w: w.janus.chat([deepseek, answer]),
                InputError, r"^messages\[0\]\.images must be a list of images, got a single str.*\['x\.png'\]"),
        LibCase("load_pil_images: images as one string", "messages", lambda w: load_pil_images([deepseek]),
                InputError, r"^conversations\[0\]\['images'\] must be a list of images"),
        LibCase("chat: a message that is a number", "messages", lambda w: w.janus.chat([5]), InputError, "messages"),
        LibCase("chat: content a number", "messages", lambda w: w.janus.chat([{"role": "user", "content": 5}]),
                InputError, r"messages\[0\]"),
        LibCase("chat: unknown part type", "messages", lambda w: w.janus.chat(
            [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), InputError, r"messages\[0\]"),
        LibCase("chat: no messages", "messages", lambda w: w.janus.chat([]), InputError, "messages"),
    ]
    return cases


# ---------------------------------------------------------------------- library: context

def _context_cases() -> list[LibCase]:
    from janusvl import validation

    many = [{"role": "user", "content": [*[{"type": "image", "image": png(16, 16)} for _ in range(50)],
                                         {"type": "text", "text": "What are these?"}]}]
    return [
        LibCase("check_length: the answer does not fit", "context", lambda w: validation.check_length(99, 5, 100),
                ContextLengthError, r"lower max_new_tokens to at most 1$"),
        LibCase("check_length: the prompt fills the context", "context",
                lambda w: validation.check_length(100, 5, 100), ContextLengthError,
                r"the prompt alone needs 100 tokens and the context holds 100; shorten the text by 5 tokens$"),
        LibCase("check_length: one image too many", "context",
                lambda w: validation.check_length(1000, 5, 100, images=1, tokens_per_image=578), ContextLengthError,
                r"remove images \(578 tokens each\) and shorten the text, 905 tokens in all$"),
        LibCase("chat: max_new_tokens 10**6", "context", lambda w: w.janus.chat("Hi", max_new_tokens=10**6),
                ContextLengthError, r"\+ max_new_tokens 1000000 exceeds the model's context of \d+ tokens"),
        LibCase("chat: 50 images (counted before any is opened)", "context",
                lambda w: w.janus.chat(many, max_new_tokens=16), ContextLengthError,
                r"with 50 image\(s\) and the context holds \d+; remove \d+ image\(s\) or shorten the text"),
        LibCase("Engine.chat_request: 50 images", "context", lambda w: w.engine.chat_request(many),
                ContextLengthError, r"remove \d+ image\(s\)"),
        LibCase("generate_images: prompt over the context", "context",
                lambda w: w.janus.generate_images("why " * 20_000), ContextLengthError,
                r"^prompt is \d+ tokens; with 576 image tokens that exceeds the model's context"),
    ]


# ---------------------------------------------------------------------- library: images

# The message each of hostile_http's image payloads gets from the library's open_image.
_PAYLOAD_MESSAGES = {
    "truncated base64": "^data URL: invalid base64 payload",
    "base64 with spaces and junk": "^data URL: invalid base64 payload",
    "wrong MIME text/plain": starts("data URL: expected 'data:image/<type>;base64,<data>', got 'data:text/plain"),
    "no ;base64 marker": "^data URL: expected 'data:image/",
    "data URL without a comma": "^data URL: expected 'data:image/",
    "truncated PNG": r"^data URL: not a readable image \(image file is truncated\)",
    "truncated JPEG": r"^data URL: not a readable image \(Truncated File Read\)",
    "1-bit PNG 13000x13000 (20 KB, 169 MP)": r"^data URL: 13000x13000 is 169,000,000 pixels, more than "
                                             r"max_image_pixels \(40,000,000\)",
    "PNG 1x60000000": r"^data URL: 1x60000000 is 60,000,000 pixels, more than max_image_pixels \(40,000,000\)",
    "file:// URL": "^file:/etc/passwd: no such image file",  # a library path, never a URL it fetches
    "javascript: URL": r"^javascript:alert\(1\): no such image file",
    "ftp:// URL": "^ftp:/example.com/cat.png: no such image file",
    "remote URL (remote images off)": "remote URLs are not fetched; download the image first",
    "loopback URL": "remote URLs are not fetched",
}
_UNREADABLE = r"^data URL: not a readable image \(unknown or unsupported format\)"
_BOMB = r"^data URL: Image size \(\d+ pixels\) exceeds limit .*; more than max_image_pixels \(40,000,000\)"


def _image_cases() -> list[LibCase]:
    from janusvl.processing.images_io import ImageLimits, open_image

    cases = []
    for name, url, status, code in image_payloads():
        if status == 200:
            cases.append(LibCase(f"open_image: {name}", "images", lambda w, u=url: open_image(u), None,
                                 check=lambda image: image.mode == "RGB" and min(image.size) >= 1))
            continue
        error = ImageTooLargeError if code == "image_too_large" else ImageLoadError
        pattern = _PAYLOAD_MESSAGES.get(name, _BOMB if error is ImageTooLargeError else _UNREADABLE)
        cases.append(LibCase(f"open_image: {name}", "images", lambda w, u=url: open_image(u), error, pattern))
    big = png(8000, 6000)  # 48 megapixels in a few KB
    red = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(red, format="PNG")
    red_url = "DATA:IMAGE/PNG;BASE64," + base64.b64encode(red.getvalue()).decode()
    empty = Image.new("RGB", (0, 0))
    cases += [
        LibCase("open_image: 48 MP PNG bytes", "images", lambda w: open_image(big), ImageTooLargeError,
                r"^bytes: 8000x6000 is 48,000,000 pixels, more than max_image_pixels \(40,000,000\)"),
        LibCase("open_image: 30x20 over max_pixels 599", "images",
                lambda w: open_image(Image.new("RGB", (30, 20)), ImageLimits(max_pixels=599)), ImageTooLargeError,
                r"^image: 30x20 is 600 pixels, more than max_image_pixels \(599\)"),
        LibCase("open_image: bytes over max_bytes 10", "images", lambda w: open_image(big, ImageLimits(max_bytes=10)),
                ImageTooLargeError, r"^bytes: [\d,]+ bytes of encoded image, more than max_image_bytes \(10\)"),
        LibCase("ImageLimits(max_pixels=0)", "images", lambda w: ImageLimits(max_pixels=0), InputError,
                "^max_image_pixels must be >= 1"),
        LibCase("open_image: a FIFO (used to hang)", "images", lambda w: open_image(w.fifo), ImageLoadError,
                "^/.*/fifo.png: not a regular file", seconds=10),
        LibCase("open_image: /dev/zero (used to read until MemoryError)", "images", lambda w: open_image("/dev/zero"),
                ImageLoadError, "^/dev/zero: not a regular file", seconds=10),
        LibCase("open_image: a directory", "images", lambda w: open_image(w.scratch), ImageLoadError,
                "^/.*: is a directory"),
        LibCase("open_image: a NUL in the path", "images", lambda w: open_image("bad\0name.png"), ImageLoadError,
                "cannot read image file"),
        LibCase("open_image: a missing file", "images", lambda w: open_image(w.scratch / "missing.png"),
                ImageLoadError, "missing.png: no such image file"),
        LibCase("open_image: a text file", "images", lambda w: open_image(w.file("notes.png", "not an image")),
                ImageLoadError, r"notes.png: not a readable image \(unknown or unsupported format\)"),
        LibCase("open_image: an int", "images", lambda w: open_image(5), ImageLoadError,
                "^cannot open an image from a int"),
        LibCase("open_image: HTTP:// upper case", "images", lambda w: open_image("HTTP://example.com/cat.png"),
                ImageLoadError, "remote URLs are not fetched"),
        LibCase("open_image: Https:// mixed case", "images", lambda w: open_image("Https://example.com/cat.png"),
                ImageLoadError, "remote URLs are not fetched"),
        LibCase("open_image: DATA:IMAGE/PNG upper case is a data URL", "images", lambda w: open_image(red_url), None,
                check=lambda image: image.getpixel((0, 0)) == (255, 0, 0)),
        LibCase("open_image: a 0x0 PIL image", "images", lambda w: open_image(empty), ImageLoadError,
                r"^image: the image is empty \(0x0 pixels\)"),
        LibCase("image_processor: a 0x0 PIL image", "images", lambda w: w.janus.processor.image_processor([empty]),
                ImageLoadError, r"^images\[0\]: the image is empty \(0x0 pixels\)"),
        LibCase("chat: a 0x0 PIL image", "images", lambda w: w.janus.chat(
            [{"role": "user", "content": [{"type": "image", "image": empty}]}], max_new_tokens=1), ImageLoadError,
                "the image is empty"),
        LibCase("chat: 48 MP PNG bytes", "images", lambda w: w.janus.chat(
            [{"role": "user", "content": [{"type": "image", "image": big}]}], max_new_tokens=1), ImageTooLargeError,
                "8000x6000 is 48,000,000 pixels"),
    ]
    return cases


# ---------------------------------------------------------------------- library: checkpoints

CONFIG_EDITS: list[tuple[str, Callable[[dict], Any], str]] = [
    ("zero attention heads", lambda d: d["language_config"].update(num_attention_heads=0),
     r"language_config\.num_attention_heads must be in \[1, 1024\], got 0"),
    ("negative hidden size", lambda d: d["language_config"].update(hidden_size=-64),
     r"language_config\.hidden_size must be in .*got -64"),
    ("heads not dividing the width", lambda d: d["language_config"].update(num_attention_heads=6),
     r"language_config\.hidden_size 64 is not a multiple of num_attention_heads 6"),
    ("KV heads not dividing the heads", lambda d: d["language_config"].update(num_key_value_heads=3),
     r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("a context of 10**12", lambda d: d["language_config"].update(max_position_embeddings=10**12),
     r"language_config\.max_position_embeddings must be in \[1, 2097152\], got 1000000000000"),
    ("negative rope_theta", lambda d: d["language_config"].update(rope_theta=-1.0),
     r"language_config\.rope_theta must be a positive number"),
    ("zero image size", lambda d: d["vision_config"]["params"].update(image_size=0),
     r"vision_config\.params\.image_size must be in"),
    ("aligner width disagrees", lambda d: d["aligner_config"]["params"].update(n_embed=32),
     r"aligner_config\.params\.n_embed 32 disagrees with language_config\.hidden_size 64"),
    ("generation head vocabulary disagrees", lambda d: d["gen_head_config"]["params"].update(image_token_size=100),
     r"gen_head_config\.params\.image_token_size 100 disagrees with gen_vision_config\.params\.image_token_size 16384"),
    ("VQ channels not a multiple of 32", lambda d: d["gen_vision_config"]["params"].update(base_channels=24),
     r"gen_vision_config\.params\.base_channels 24 x channel_multiplier 1 is not a multiple of 32"),
    ("channel_multiplier not a list of ints",
     lambda d: d["gen_vision_config"]["params"].update(channel_multiplier=["x"]),
     r"gen_vision_config\.params\.channel_multiplier must be a list"),
    ("generation aligner depth 0", lambda d: d["gen_aligner_config"]["params"].update(depth=0),
     r"gen_aligner_config\.params\.depth must be in \[1, 64\]"),
]


def _edited_config(edit: Callable[[dict], Any]) -> dict:
    data = config_dict("tiny", vocab_size=640)
    edit(data)
    return data


def _edit_json(name: str, **changes: Any) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = json.loads((root / name).read_text())
        (root / name).write_text(json.dumps({**data, **changes}))
    return edit


def _checkpoint_cases() -> list[LibCase]:
    from janusvl import MultiModalityCausalLM, VLChatProcessor
    from janusvl.loading.checkpoint import load_model

    cases = [LibCase(f"config: {name}", "checkpoint", lambda w, e=edit: JanusConfig.from_dict(_edited_config(e)),
                     ConfigError, pattern) for name, edit, pattern in CONFIG_EDITS]
    for tokens in (100, 10**12):
        cases.append(LibCase(
            f"processor: num_image_tokens {tokens}", "checkpoint",
            lambda w, t=tokens: VLChatProcessor.from_pretrained(
                w.checkpoint(f"tokens-{t}", _edit_json("processor_config.json", num_image_tokens=t))),
            ConfigError, rf"num_image_tokens {tokens} disagrees with the vision tower in config\.json: "
                         r"\(image_size 384 / patch size 16\)\^2 = 576"))

    def nan_weight(root: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(root / "model.safetensors"))
        state["language_model.model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
        (root / "model.safetensors").unlink()  # a hard link to the tiny checkpoint's own file
        save_file(state, str(root / "model.safetensors"))

    def escaping_index(root: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(root / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        (root / "model.safetensors").rename(root.parent / "elsewhere.safetensors")
        index = {"metadata": {}, "weight_map": {k: "../elsewhere.safetensors" for k in keys}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))

    cases += [
        LibCase("processor: preprocessor image_size 512", "checkpoint", lambda w: VLChatProcessor.from_pretrained(
            w.checkpoint("pre-512", _edit_json("preprocessor_config.json", image_size=512))), ConfigError,
                r"preprocessor_config\.json image_size 512 disagrees with config\.json"),
        LibCase("weights: a NaN", "checkpoint", lambda w: MultiModalityCausalLM.from_pretrained(
            w.checkpoint("nan", nan_weight), dtype="auto"), CheckpointError,
                r"model\.safetensors: 'language_model\.model\.layers\.1\.mlp\.up_proj\.weight' holds NaN or "
                r"infinite values; pass allow_nonfinite=True"),
        LibCase("index: a shard outside the checkpoint", "checkpoint", lambda w: load_model(
            w.checkpoint("escape", escaping_index), device="cpu"), CheckpointError,
                "names shard '../elsewhere.safetensors', which is outside the checkpoint directory"),
        LibCase("config.json: not JSON", "checkpoint", lambda w: load_model(w.checkpoint(
            "bad-json", lambda root: (root / "config.json").write_text("{nope")), device="cpu"), ConfigError,
                "config.json"),
        LibCase("config.json: a list", "checkpoint", lambda w: load_model(w.checkpoint(
            "list-json", lambda root: (root / "config.json").write_text("[1, 2]")), device="cpu"), ConfigError,
                "config.json"),
        LibCase("no weights", "checkpoint", lambda w: load_model(w.checkpoint(
            "no-weights", lambda root: (root / "model.safetensors").unlink()), device="cpu"), CheckpointError,
                "safetensors"),
        LibCase("weights: not a safetensors file", "checkpoint", lambda w: load_model(w.checkpoint(
            "junk-weights", lambda root: ((root / "model.safetensors").unlink(),
                                          (root / "model.safetensors").write_bytes(b"\x00" * 64))), device="cpu"),
                CheckpointError, "model.safetensors"),
    ]
    return cases


def library_cases() -> list[LibCase]:
    cases = [*_argument_cases(), *_text_cases(), *_context_cases(), *_image_cases(), *_checkpoint_cases()]
    assert len({c.name for c in cases}) == len(cases), "case names identify cases"
    return cases


# ---------------------------------------------------------------------- CLI

def _write_bomb(world: World) -> None:
    world.file("bomb.png", png(13000, 13000))
    world.file("small.png", png(30, 30))
    world.file("notes.png", "not an image")
    _ = world.fifo


def cli_cases() -> list[CliCase]:
    never = "{scratch}/never-loaded"  # a model that does not exist: these fail before loading
    usage = [
        ("--top-k 2.7", ["chat", "M", "--top-k", "2.7", "hi"], "argument --top-k: invalid int value: '2.7'"),
        ("--seed 2**70", ["chat", "M", "--seed", str(2**70), "hi"], f"argument --seed: must be at most {2**63 - 1}"),
        ("--max-image-pixels 0", ["chat", "M", "--max-image-pixels", "0", "hi"],
         "argument --max-image-pixels: must be >= 1, got 0"),
        ("imagine -n 65", ["imagine", "M", "p", "-n", "65"],
         "argument -n/--num-images: expected at most 64 images per run"),
        ("imagine --cfg-weight 1e30", ["imagine", "M", "p", "--cfg-weight", "1e30"],
         "argument --cfg-weight: expected at most 100"),
        ("imagine --temperature 1e-9", ["imagine", "M", "p", "--temperature", "1e-9"],
         "argument --temperature: expected at least 1e-05"),
        ("an unknown command", ["frobnicate", "M"], "argument COMMAND: invalid choice: 'frobnicate'"),
        ("chat without a prompt or model", ["chat"], "the following arguments are required"),
    ]
    cases = [CliCase(f"usage: {name}", "usage", tuple(argv), 2, re.escape(message)) for name, argv, message in usage]
    values = [
        ("--temperature nan", ["--temperature", "nan"],
         "janusvl chat: error: --temperature must be a finite number, got nan"),
        ("--temperature 1e-9", ["--temperature", "1e-9"],
         "janusvl chat: error: --temperature must be 0 (greedy) or at least 1e-05"),
        ("--top-p 1.5", ["--top-p", "1.5"], "janusvl chat: error: --top-p must be in (0, 1], got 1.5"),
        ("--max-new-tokens 0", ["--max-new-tokens", "0"], "janusvl chat: error: --max-new-tokens must be >= 1, got 0"),
    ]
    cases += [CliCase(f"chat {name} (before loading)", "values", ("chat", never, *flags, "hi"), 1, cli_starts(message),
                      absent=("Loading",)) for name, flags, message in values]
    image = [
        ("over --max-image-pixels", ["--image", "{scratch}/small.png", "--max-image-pixels", "100"],
         re.escape("30x30 is 900 pixels, more than max_image_pixels (100)")),
        ("a 13000x13000 bomb", ["--image", "{scratch}/bomb.png"], "169,000,000 pixels, more than max_image_pixels"),
        ("a FIFO", ["--image", "{scratch}/fifo.png"], "fifo.png: not a regular file"),
        ("/dev/zero", ["--image", "/dev/zero"], "/dev/zero: not a regular file"),
        ("a directory", ["--image", "{scratch}"], "is a directory"),
        ("a missing file", ["--image", "{scratch}/missing.png"], "missing.png: no such image file"),
        ("a text file", ["--image", "{scratch}/notes.png"], "notes.png: not a readable image"),
        ("an upper-case HTTP URL", ["--image", "HTTP://example.com/cat.png"], "remote URLs are not fetched"),
    ]
    cases += [CliCase(f"chat --image {name} (before loading)", "images", ("chat", never, *flags, "hi"), 1,
                      "^janusvl chat: error: .*" + pattern, absent=("Loading",), prepare=_write_bomb)
              for name, flags, pattern in image]
    cases += [
        CliCase("chat: a model that does not exist", "model", ("chat", never, "hi"), 1, "^janusvl chat: error: "),
        CliCase("chat: a config with zero attention heads", "model", ("chat", "{scratch}/zero-heads", "hi"), 1,
                r"language_config\.num_attention_heads must be in \[1, 1024\], got 0",
                prepare=lambda w: _zero_heads(w)),
        CliCase("chat: --max-new-tokens over the context", "model",
                ("chat", "{tiny}", "--device", "cpu", "--max-new-tokens", "1000000", "hi"), 1,
                r"^janusvl chat: error: prompt of \d+ tokens \+ max_new_tokens 1000000 exceeds the model's context"),
        CliCase("serve --max-image-pixels 0", "values", ("serve", never, "--max-image-pixels", "0"), 1,
                cli_starts("janusvl serve: error: --max-image-pixels must be >= 1, got 0"), absent=("Loading",)),
        CliCase("serve --port 70000", "values", ("serve", never, "--port", "70000"), 1,
                cli_starts("janusvl serve: error: --port must be in 0..65535, got 70000"), absent=("Loading",)),
        CliCase("serve --read-timeout 0", "values", ("serve", never, "--read-timeout", "0"), 1,
                cli_starts("janusvl serve: error: --read-timeout must be > 0, got 0"), absent=("Loading",)),
        CliCase("convert --force into a folder of other files", "files",
                ("convert", "{tiny}", "{scratch}/project", "--force"), 1,
                re.escape("does not hold a previous conversion (it holds 'main.py', which a conversion does "
                          "not write)"),
                prepare=lambda w: _project(w)),
    ]
    return cases


def _zero_heads(world: World) -> None:
    world.checkpoint("zero-heads", lambda root: _edit_json("config.json", language_config={
        **json.loads((root / "config.json").read_text())["language_config"], "num_attention_heads": 0})(root))


def _project(world: World) -> None:
    project = world.scratch / "project"
    project.mkdir(exist_ok=True)
    for name in ("main.py", "notes.txt"):
        (project / name).write_text(name)


# These also run as their own `python -m janusvl` processes: the real entry point and exit status.
IN_OWN_PROCESS = ("usage: an unknown command", "chat --image a FIFO (before loading)",
                  "chat: a config with zero attention heads")


def cli_argv(case: CliCase, world: World) -> list[str]:
    return [a.replace("{tiny}", str(world.tiny_dir)).replace("{scratch}", str(world.scratch)) for a in case.argv]


def run_cli_cases(world: World) -> list[Outcome]:
    """Every CLI case through `janusvl.cli.main` in one driver process, then IN_OWN_PROCESS again
    as separate processes (named "... [process]")."""
    cases = cli_cases()
    for case in cases:
        case.prepare(world)
    outcomes = run_cli(cases, lambda c: cli_argv(c, world))
    for case in cases:
        if case.name in IN_OWN_PROCESS:
            outcome = run_cli_process(case, cli_argv(case, world))
            outcome.case += " [process]"
            outcomes.append(outcome)
    return outcomes
