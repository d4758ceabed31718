"""Processing layer: pixels, tokenizer, chat template, VLChatProcessor, image loading.

transformers (JanusImageProcessorPil, AutoTokenizer) serves as the independent oracle.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janusvl.errors import ConfigError, ImageLoadError, InputError
from janusvl.processing import (
    DEFAULT_SYSTEM_PROMPT,
    BatchedVLChatProcessorOutput,
    JanusTokenizer,
    VLChatProcessor,
    VLChatProcessorOutput,
    VLMImageProcessor,
    apply_sft_template,
    load_pil_images,
    open_image,
)
from janusvl.testing.tokenizer import write_processor_configs, write_tokenizer

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SYS = DEFAULT_SYSTEM_PROMPT


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("janus_processing")
    write_tokenizer(path)
    write_processor_configs(path)
    return path


@pytest.fixture(scope="module")
def processor(ckpt: Path) -> VLChatProcessor:
    return VLChatProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt: Path):
    import transformers  # the oracle: a test dependency, so a missing one fails rather than skips

    return transformers.AutoTokenizer.from_pretrained(str(ckpt))


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    return dst


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- image preprocessing ----------------------------------------------------------------------

def _image_cases() -> dict[str, Image.Image]:
    rgba = np.random.default_rng(1).integers(0, 256, (150, 90, 4), dtype=np.uint8)
    return {
        "wide": _random_image(640, 480),
        "tall": _random_image(300, 800, seed=2),
        "tiny_40x7": _random_image(40, 7, seed=3),
        "grayscale": _random_image(97, 203, seed=4).convert("L"),
        "rgba": Image.fromarray(rgba, mode="RGBA"),
        "palette": _random_image(120, 80, seed=5).convert("P", palette=Image.Palette.ADAPTIVE),
    }


@pytest.mark.parametrize("name", list(_image_cases()))
def test_pixels_bit_exact_with_transformers(name: str) -> None:
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    image = _image_cases()[name]
    width, height = image.size
    short = min(width, height) / max(width, height) * 384
    assert int(short) == round(short), "pick sizes where DeepSeek's int() and transformers' round() agree"
    ref = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_size=14)
    expected = ref(images=[image.convert("RGB")], return_tensors="pt").pixel_values
    ours = VLMImageProcessor()([image]).pixel_values
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 384, 384)
    assert torch.equal(ours, expected)


def test_resize_truncates_like_deepseek() -> None:
    # 11 / 40 * 384 = 105.6: DeepSeek keeps 105 rows (transformers would round to 106).
    out = VLMImageProcessor()([_random_image(40, 11)]).pixel_values[0]
    grey = np.float32((np.float32(127 / 255) - np.float32(0.5)) / np.float32(0.5))
    grey_rows = (out == torch.tensor(grey)).all(dim=2).all(dim=0)  # [384] True where a row is all grey
    top, rows, bottom = 139, 105, 140  # (384 - 105) // 2 above the image, the rest below
    assert grey_rows[:top].all() and grey_rows[top + rows:].all()
    assert not grey_rows[top:top + rows].any()
    assert int(grey_rows.sum()) == top + bottom


def test_image_processor_batch_and_values() -> None:
    proc = VLMImageProcessor()
    assert proc.background_color == (127, 127, 127)
    white = Image.new("RGB", (384, 384), (255, 255, 255))
    black = Image.new("RGB", (384, 384), (0, 0, 0))
    out = proc([white, black, _random_image(50, 20)]).pixel_values
    assert out.shape == (3, 3, 384, 384)
    assert torch.all(out[0] == 1.0) and torch.all(out[1] == -1.0)
    assert proc([]).pixel_values.shape == (0, 3, 384, 384)


def test_image_processor_from_pretrained(tmp_path: Path) -> None:
    assert VLMImageProcessor.from_pretrained(tmp_path).image_size == 384  # no file: Janus defaults
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_size": 64, "min_size": 14, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "rescale_factor": 1 / 255, "do_normalize": False}))
    proc = VLMImageProcessor.from_pretrained(tmp_path)
    out = proc([Image.new("RGB", (10, 10), (51, 102, 255))]).pixel_values
    assert out.shape == (1, 3, 64, 64)
    # do_normalize false (an early Janus-1.3B revision): only x * rescale_factor.
    assert out[0, :, 0, 0].tolist() == [np.float32(51 / 255), np.float32(102 / 255), 1.0]
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        VLMImageProcessor.from_pretrained(tmp_path)


# --- tokenizer --------------------------------------------------------------------------------

TEXTS = [
    "Describe this image in detail.",
    "<|User|>: <image_placeholder>\nWhat is in the picture?\n\n<|Assistant|>:",
    f"{BOS}already a bos{EOS}{PAD}<begin_of_image><end_of_image>",
    "café crème, 日本語 and 한국어 🦙😀 ❤️",
    "  leading and trailing spaces \n\n\t tabs ",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(ckpt: Path, hf_tokenizer, text: str) -> None:
    tok = JanusTokenizer.from_pretrained(ckpt)
    ids = tok.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert ids[0] == tok.bos_token_id and ids[1:] == tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids[1:]) == text  # byte-level BPE round-trips exactly
    assert tok(text)["input_ids"] == hf_tokenizer(text)["input_ids"]


def test_tokenizer_partial_multibyte_and_api(ckpt: Path, hf_tokenizer) -> None:
    tok = JanusTokenizer.from_pretrained(ckpt)
    ids = tok.encode("🦙 한국어", add_special_tokens=False)
    assert len(ids) > 3  # characters absent from the training corpus span several byte tokens
    for cut in range(1, len(ids)):
        assert tok.decode(ids[:cut]) == hf_tokenizer.decode(ids[:cut])
    batch = torch.tensor([tok.encode("a cat"), tok.encode("a dog")])
    assert tok.decode(batch[0]) == hf_tokenizer.decode(batch[0].tolist())
    assert tok.batch_decode(batch, skip_special_tokens=True) == ["a cat", "a dog"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id)
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    assert len(tok) == len(hf_tokenizer) and tok.get_vocab() == hf_tokenizer.get_vocab() == tok.vocab
    tokens = ["<image_placeholder>", "Ġthis", BOS]
    assert tok.convert_tokens_to_ids(tokens) == hf_tokenizer.convert_tokens_to_ids(tokens)
    assert tok.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)
    assert tok.convert_tokens_to_ids("no-such-token") is None  # Janus names no unk token
    with pytest.raises(InputError):
        tok.decode(batch)


def test_tokenizer_bos_without_post_processor(ckpt: Path, tmp_path: Path) -> None:
    # DeepSeek's pipeline (transformers 4.x LlamaTokenizerFast) rebuilds the post-processor from
    # add_bos_token, so BOS does not depend on tokenizer.json having one. (transformers 5 reads
    # tokenizer.json's post-processor instead, so it is no oracle for this case.)
    path = _copy_tokenizer(ckpt, tmp_path / "no_post")
    data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tok = JanusTokenizer.from_pretrained(path)
    reference = JanusTokenizer.from_pretrained(ckpt)
    assert tok.encode("Hello there") == reference.encode("Hello there")
    bare = tok.encode("Hello there", add_special_tokens=False)
    assert tok.encode("Hello there") == [tok.bos_token_id, *bare]
    assert tok.encode(f"{BOS}Hello").count(tok.bos_token_id) == 2  # a literal BOS in the text stays


def test_tokenizer_config_defaults_and_variants(ckpt: Path, tmp_path: Path) -> None:
    path = _copy_tokenizer(ckpt, tmp_path / "variant")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("add_bos_token", "clean_up_tokenization_spaces", "pad_token"):
        del config[key]
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    tok = JanusTokenizer.from_pretrained(path)
    ids = tok.encode("Is it red ?")
    assert ids[0] == tok.bos_token_id  # add_bos_token defaults to True
    assert tok.pad_token_id is None  # no file names a pad token
    assert tok.decode(ids[1:]) == "Is it red ?"  # clean-up defaults to False

    config["clean_up_tokenization_spaces"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    # As transformers 4.x (DeepSeek's pipeline) applied it: " ?" and " ," lose their space.
    assert JanusTokenizer.from_pretrained(path).decode(ids[1:]) == "Is it red?"


def test_write_tokenizer_is_deterministic(tmp_path: Path) -> None:
    size_pro = write_tokenizer(tmp_path / "a")
    write_tokenizer(tmp_path / "b")
    first, second = (tmp_path / d / "tokenizer.json" for d in "ab")
    assert first.read_bytes() == second.read_bytes()
    size_13b = write_tokenizer(tmp_path / "c", roles="1.3b")
    pro, old = JanusTokenizer.from_pretrained(tmp_path / "a"), JanusTokenizer.from_pretrained(tmp_path / "c")
    assert size_pro == len(pro) and size_13b == len(old) == size_pro - 2
    assert pro.token_to_id("<|User|>") is not None and old.token_to_id("<|User|>") is None
    # Janus order: BOS, EOS, pad right after the base vocabulary, then the image tokens.
    base = pro.bos_token_id
    following = [pro.eos_token_id, pro.pad_token_id, pro.token_to_id("<begin_of_image>")]
    assert following == [base + 1, base + 2, base + 3]


def test_tokenizer_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path / "tokenizer.json")):
        JanusTokenizer.from_pretrained(tmp_path)


# --- chat template ----------------------------------------------------------------------------

def test_template_janus_pro_one_image() -> None:
    conversation = [
        {"role": "<|User|>", "content": "<image_placeholder>\nDescribe this image.", "images": ["x.png"]},
        {"role": "<|Assistant|>", "content": ""},
    ]
    expected = SYS + "\n\n<|User|>: <image_placeholder>\nDescribe this image.\n\n<|Assistant|>:"
    assert apply_sft_template(conversation) == expected


def test_template_janus_13b_multi_turn() -> None:
    conversation = [
        {"role": "User", "content": "  What is this?\n"},
        {"role": "Assistant", "content": "A cat."},
        {"role": "User", "content": "What colour?"},
        {"role": "Assistant", "content": ""},
    ]
    expected = (SYS + "\n\nUser: What is this?\n\nAssistant: A cat.<｜end▁of▁sentence｜>"
                "User: What colour?\n\nAssistant:")
    assert apply_sft_template(conversation) == expected


def test_template_empty_system_prompt_and_final_strip() -> None:
    conversation = [{"role": "User", "content": "hi"}, {"role": "Assistant", "content": ""}]
    assert apply_sft_template(conversation, system_prompt="") == "User: hi\n\nAssistant:"
    # A trailing user turn leaves "\n\n" that the final strip removes.
    assert apply_sft_template([{"role": "User", "content": "hi"}], system_prompt="S") == "S\n\nUser: hi"
    with pytest.raises(InputError, match="sft_format"):
        apply_sft_template(conversation, sft_format="llava")


def test_processor_template_defaults(processor: VLChatProcessor) -> None:
    conversation = [{"role": "User", "content": "hi"}, {"role": "Assistant", "content": ""}]
    # DeepSeek's method defaults to no system prompt; process_one uses the processor's.
    assert processor.apply_sft_template_for_multi_turn_prompts(conversation) == "User: hi\n\nAssistant:"
    assert processor.process_one(conversations=conversation).sft_format == SYS + "\n\nUser: hi\n\nAssistant:"


# --- VLChatProcessor --------------------------------------------------------------------------

def _conversation(n_images: int, question: str = "Describe this image.") -> list[dict]:
    tags = "".join("<image_placeholder>\n" for _ in range(n_images))
    return [
        {"role": "<|User|>", "content": tags + question, "images": [f"img{i}.png" for i in range(n_images)]},
        {"role": "<|Assistant|>", "content": ""},
    ]


def test_processor_ids_are_looked_up(processor: VLChatProcessor, ckpt: Path, tmp_path: Path) -> None:
    tok = processor.tokenizer
    assert processor.image_id == tok.token_to_id("<image_placeholder>")
    assert processor.image_start_id == tok.token_to_id("<begin_of_image>")
    assert processor.image_end_id == tok.token_to_id("<end_of_image>")
    assert processor.pad_id == tok.token_to_id(PAD)
    assert len({processor.image_id, processor.image_start_id, processor.image_end_id, processor.pad_id}) == 4
    assert (processor.num_image_tokens, processor.sft_format) == (576, "deepseek")
    # A different image_tag in processor_config.json changes the id the processor uses.
    path = _copy_tokenizer(ckpt, tmp_path / "tag")
    (path / "processor_config.json").write_text(json.dumps({"image_tag": "<patch_placeholder>"}))
    assert VLChatProcessor.from_pretrained(path).image_id == tok.token_to_id("<patch_placeholder>")


def test_process_one_expands_the_image_span(processor: VLChatProcessor) -> None:
    image = _random_image(200, 100)
    out = processor.process_one(conversations=_conversation(1), images=[image])
    tok = processor.tokenizer
    before = SYS + "\n\n<|User|>: "
    after = "\nDescribe this image.\n\n<|Assistant|>:"
    assert out.sft_format == before + "<image_placeholder>" + after
    head = [tok.bos_token_id, *tok.encode(before, add_special_tokens=False)]
    expected = [*head, processor.image_start_id, *[processor.image_id] * 576, processor.image_end_id,
                *tok.encode(after, add_special_tokens=False)]
    assert out.input_ids.dtype == torch.long and out.input_ids.tolist() == expected
    ids = out.input_ids
    start = len(head)
    assert ids[start] == processor.image_start_id and ids[start + 577] == processor.image_end_id
    assert (ids[start + 1:start + 577] == processor.image_id).all()
    assert int((ids == processor.image_id).sum()) == 576
    assert len(out) == len(tok.encode(out.sft_format)) + 577
    assert out.num_image_tokens == [576]
    assert torch.equal(out.pixel_values, processor.image_processor([image]).pixel_values)


def test_process_one_prompt_and_errors(processor: VLChatProcessor) -> None:
    prompt = "<image_placeholder><image_placeholder>Which is brighter?"
    dark, bright = Image.new("RGB", (8, 8), (10, 10, 10)), Image.new("RGB", (8, 8), (250, 250, 250))
    out = processor.process_one(prompt=prompt, images=[dark, bright])
    assert out.sft_format == prompt and out.num_image_tokens == [576, 576]
    assert out.input_ids[0] == processor.tokenizer.bos_token_id
    assert int((out.input_ids == processor.image_id).sum()) == 1152
    assert out.pixel_values[0].mean() < 0 < out.pixel_values[1].mean()  # images kept in order
    # Images may also be given as encoded bytes (or paths, data URLs): same pixels.
    from_bytes = processor.process_one(prompt=prompt, images=[_png_bytes(dark), _png_bytes(bright)])
    assert torch.equal(from_bytes.pixel_values, out.pixel_values)
    with pytest.raises(InputError, match="2 <image_placeholder> tag"):
        processor.process_one(prompt=prompt, images=[dark])
    with pytest.raises(InputError, match="0 <image_placeholder> tag"):
        processor.process_one(prompt="no tags here", images=[dark])
    with pytest.raises(InputError, match="exactly one"):
        processor.process_one(prompt=prompt, conversations=_conversation(2), images=[dark, bright])
    with pytest.raises(InputError, match="exactly one"):
        processor.process_one()


def test_batchify_mixed_batch(processor: VLChatProcessor) -> None:
    images = [_random_image(64, 32, seed=s) for s in range(3)]
    samples = [
        processor.process_one(conversations=_conversation(0, "Tell me a long story about a cat, please.")),
        processor.process_one(conversations=_conversation(1), images=images[:1]),
        processor.process_one(conversations=_conversation(2, "Compare."), images=images[1:]),
    ]
    batch = processor.batchify(samples)
    B, T = 3, max(len(s) for s in samples)
    assert T == len(samples[2])
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.images_seq_mask.shape == (B, T)
    assert batch.pixel_values.shape == (B, 2, 3, 384, 384)
    assert batch.images_emb_mask.shape == (B, 2, 576)
    assert batch.sft_format == [s.sft_format for s in samples]
    for b, sample in enumerate(samples):
        pad = T - len(sample)
        assert (batch.input_ids[b, :pad] == processor.pad_id).all()
        assert torch.equal(batch.input_ids[b, pad:], sample.input_ids)
        assert batch.attention_mask[b].tolist() == [0] * pad + [1] * len(sample)
        assert torch.equal(batch.images_seq_mask[b], batch.input_ids[b] == processor.image_id)
        # Each row has as many image positions as real image-embedding rows.
        assert int(batch.images_seq_mask[b].sum()) == int(batch.images_emb_mask[b].sum()) == 576 * b
    assert batch.images_emb_mask[:, :, 0].tolist() == [[False, False], [True, False], [True, True]]
    assert torch.equal(batch.pixel_values[1, 0], samples[1].pixel_values[0])
    assert torch.equal(batch.pixel_values[2], samples[2].pixel_values)
    assert not batch.pixel_values[0].any() and not batch.pixel_values[1, 1].any()


def test_call_outputs_to_and_dict_access(processor: VLChatProcessor) -> None:
    conversation = _conversation(0, "Hi")
    single = processor(conversations=conversation, force_batchify=False)
    assert isinstance(single, VLChatProcessorOutput)
    batch = processor(conversations=conversation)
    assert isinstance(batch, BatchedVLChatProcessorOutput)
    # A text-only batch still carries one all-zero image slot, as DeepSeek's does.
    assert batch.pixel_values.shape == (1, 1, 3, 384, 384) and not batch.pixel_values.any()
    assert batch.images_emb_mask.shape == (1, 1, 576) and not batch.images_emb_mask.any()
    assert torch.equal(batch.input_ids[0], single.input_ids)
    assert set(batch.keys()) == {"sft_format", "input_ids", "attention_mask", "pixel_values",
                                 "images_seq_mask", "images_emb_mask"}
    as_kwargs = dict(**batch)
    assert as_kwargs["input_ids"] is batch["input_ids"] is batch.input_ids
    with pytest.raises(KeyError):
        batch["labels"]
    moved = batch.to("cpu", dtype=torch.bfloat16)
    assert moved is batch
    assert batch.pixel_values.dtype == torch.bfloat16 and batch.input_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.long and batch.images_seq_mask.dtype == torch.bool


def test_processor_config_errors(ckpt: Path, tmp_path: Path) -> None:
    path = _copy_tokenizer(ckpt, tmp_path / "bad")
    (path / "processor_config.json").write_text(json.dumps({"sft_format": "vicuna"}))
    with pytest.raises(ConfigError, match="sft_format"):
        VLChatProcessor.from_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"image_tag": "<nope>"}))
    with pytest.raises(ConfigError, match="<nope>"):
        VLChatProcessor.from_pretrained(path)
    with pytest.raises(ConfigError, match="tokenizer.json"):
        VLChatProcessor.from_pretrained(tmp_path / "empty")


# --- loading images ---------------------------------------------------------------------------

def test_load_pil_images_from_every_source(tmp_path: Path) -> None:
    reference = [_random_image(12, 9, seed=s) for s in range(4)]
    file = tmp_path / "a.png"
    file.write_bytes(_png_bytes(reference[0]))
    data_url = "data:image/png;base64," + base64.b64encode(_png_bytes(reference[1])).decode()
    rgba = reference[3].convert("RGBA")
    conversation = [
        {"role": "User", "content": "<image_placeholder><image_placeholder>",
         "images": [str(file), data_url]},
        {"role": "Assistant", "content": "ok"},  # no "images" key
        {"role": "User", "content": "<image_placeholder><image_placeholder>",
         "images": [_png_bytes(reference[2]), rgba]},
    ]
    images = load_pil_images(conversation)
    assert [im.mode for im in images] == ["RGB"] * 4
    for got, want in zip(images, reference):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert np.array_equal(np.asarray(open_image(file)), np.asarray(reference[0]))  # Path works too


def test_image_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_pil_images([{"role": "User", "content": "", "images": [str(missing)]}])
    with pytest.raises(ImageLoadError, match="bytes"):
        open_image(b"definitely not an image")
    not_image = "data:image/png;base64," + base64.b64encode(b"plain text").decode()
    with pytest.raises(ImageLoadError, match="data URL"):
        open_image(not_image)
    with pytest.raises(ImageLoadError, match="data URL"):
        open_image("data:image/png;base64,@@@not base64@@@")
    text_file = tmp_path / "notes.png"
    text_file.write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.png"):
        open_image(text_file)
