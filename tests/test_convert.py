"""`janusvl convert`: lossless DeepSeek-layout copies from every weight layout, the transformers
layout (loaded strictly by transformers, same logits), and failures that leave nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_image, rel_error
from janusvl import CheckpointError, CheckpointNotFoundError, ConfigError, InputError, MultiModalityCausalLM
from janusvl.cli import main
from janusvl.cli.convert import parse_size
from janusvl.loading.convert import ConvertError, convert_checkpoint
from janusvl.testing.checkpoint import WEIGHT_LAYOUTS, save_weights, write_checkpoint
from test_loading import copy_without_weights, make_hub_cache

UNUSED = ("vision_model.vision_tower.attn_pool.latent", "gen_vision_model.quantize.codebook_used")
CONVERSATION = [{"role": "<|User|>", "content": "<image_placeholder>\nDescribe this.",
                 "images": [make_image(200, 120, seed=11)]},
                {"role": "<|Assistant|>", "content": ""}]


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("convert") / "ckpt", dtype=torch.bfloat16, seed=7)


@pytest.fixture(scope="module")
def reference(bf16_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bf16_dir / "model.safetensors"))


def last_logits(model: MultiModalityCausalLM, processor) -> torch.Tensor:
    batch = processor(conversations=CONVERSATION, images=CONVERSATION[0]["images"])
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**batch.to("cpu", model.dtype))
        return model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits[:, -1]


@pytest.fixture(scope="module")
def reference_logits(bf16_dir: Path) -> torch.Tensor:
    from janusvl import load_pretrained_model

    _, processor, model = load_pretrained_model(bf16_dir, device="cpu")
    return last_logits(model, processor)


def small_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir()
            if p.suffix == ".json" and not p.name.endswith(".index.json")}


def source_in_layout(bf16_dir: Path, reference: dict[str, torch.Tensor], dst: Path, layout: str) -> Path:
    dst.mkdir()
    for name, data in small_files(bf16_dir).items():
        (dst / name).write_bytes(data)
    save_weights(reference, dst, layout, shards=3)
    return dst


def read_output(dst: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Every tensor of a safetensors checkpoint, and which keys each file holds (checked against
    the index when there is one)."""
    index = dst / "model.safetensors.index.json"
    files = sorted(dst.glob("*.safetensors"))
    tensors, by_file = {}, {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            by_file[path.name] = list(f.keys())
            for key in f.keys():
                assert key not in tensors, f"{key} stored twice"
                tensors[key] = f.get_tensor(key)
    if index.exists():
        data = json.loads(index.read_text())
        assert data["weight_map"] == {k: name for name, keys in by_file.items() for k in keys}
        assert data["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    return tensors, by_file


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
def test_deepseek_copy_is_lossless_from_every_layout(bf16_dir, reference, reference_logits, tmp_path, layout) -> None:
    src = source_in_layout(bf16_dir, reference, tmp_path / "src", layout)
    total = sum(t.nbytes for t in reference.values())
    limit = total // 4
    dst = convert_checkpoint(src, tmp_path / "out", max_shard_bytes=limit)

    tensors, by_file = read_output(dst)
    assert len(by_file) >= 4
    assert sorted(by_file) == [f"model-{i:05d}-of-{len(by_file):05d}.safetensors" for i in range(1, len(by_file) + 1)]
    for name, keys in by_file.items():  # full shards stay under the limit; only a lone tensor may not
        assert len(keys) == 1 or sum(tensors[k].nbytes for k in keys) <= limit, name
    assert set(tensors) == set(reference) and all(k in tensors for k in UNUSED)
    for key, want in reference.items():
        assert tensors[key].dtype == want.dtype and torch.equal(tensors[key], want), key

    assert small_files(dst) == small_files(src)  # byte for byte
    modes = {p.stat().st_mode & 0o777 for p in dst.iterdir()}  # shards as readable as the json files
    assert modes == {(dst / "config.json").stat().st_mode & 0o777}
    assert {p.name for p in dst.iterdir()} == set(small_files(src)) | set(by_file) | {"model.safetensors.index.json"}
    assert leftovers(tmp_path) == []

    from janusvl import load_pretrained_model

    _, processor, model = load_pretrained_model(dst, device="cpu")
    assert model.dtype == torch.bfloat16
    assert torch.equal(last_logits(model, processor), reference_logits)


def test_one_shard_is_a_single_file_and_dtype_casts(bf16_dir, reference, tmp_path) -> None:
    dst = convert_checkpoint(bf16_dir, tmp_path / "fp32", dtype="float32")
    assert sorted(p.name for p in dst.glob("model*")) == ["model.safetensors"]
    tensors, _ = read_output(dst)
    assert set(tensors) == set(reference)
    for key, want in reference.items():
        assert tensors[key].dtype == torch.float32 and torch.equal(tensors[key], want.float()), key
    # config.json states the new dtype (the loader's "auto" follows it); nothing else changes.
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["language_config"]["torch_dtype"] == "float32"
    source = json.loads((bf16_dir / "config.json").read_text())
    source["torch_dtype"] = source["language_config"]["torch_dtype"] = "float32"
    assert config == source
    src_files, dst_files = small_files(bf16_dir), small_files(dst)
    assert {k: v for k, v in dst_files.items() if k != "config.json"} == \
           {k: v for k, v in src_files.items() if k != "config.json"}
    assert MultiModalityCausalLM.from_pretrained(dst, device="cpu").dtype == torch.float32


def test_hf_layout_loads_strictly_in_transformers_with_the_same_logits(tiny, tiny_dir, tmp_path) -> None:
    import transformers

    from janusvl.loading.hf_layout import to_transformers_state_dict

    dst = convert_checkpoint(tiny_dir, tmp_path / "hf", to="hf", max_shard_bytes=30 * 10**6)
    _, by_file = read_output(dst)
    assert len(by_file) >= 2
    config = json.loads((dst / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["torch_dtype"]) == \
           ("janus", ["JanusForConditionalGeneration"], "float32")

    hf, info = transformers.JanusForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    tokenizer, processor, model = tiny
    want = to_transformers_state_dict(model.state_dict())
    got = hf.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key

    # transformers' own processor, from the written files, builds the same inputs as ours.
    hf_processor = transformers.AutoProcessor.from_pretrained(dst)
    ours = processor(conversations=CONVERSATION, images=CONVERSATION[0]["images"])
    text = ours.sft_format[0].removeprefix(processor.system_prompt + "\n\n")
    theirs = hf_processor(text=text, images=CONVERSATION[0]["images"], return_tensors="pt")
    assert torch.equal(theirs["input_ids"], ours.input_ids)
    assert torch.equal(theirs["pixel_values"], ours.pixel_values[:, 0])
    assert hf.config.image_token_id == processor.image_id == tokenizer.vocab["<image_placeholder>"]
    assert hf.config.text_config.eos_token_id == tokenizer.eos_token_id

    with torch.no_grad():
        logits = hf.eval()(**theirs).logits[:, -1]
    torch.testing.assert_close(logits, last_logits(model, processor), rtol=0, atol=2e-5)


def test_hub_id_from_a_cache_of_symlinks(bf16_dir, reference, tmp_path, monkeypatch) -> None:
    """As huggingface_hub lays it out: snapshot entries are symlinks into blobs/."""
    repo = tmp_path / "hub" / "models--deepseek-ai--Janus-Pro-1B"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(bf16_dir.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    dst = convert_checkpoint("deepseek-ai/Janus-Pro-1B", tmp_path / "out", max_shard_bytes=10**7)
    assert not any(p.is_symlink() for p in dst.iterdir())
    assert small_files(dst) == small_files(bf16_dir)
    tensors, by_file = read_output(dst)
    assert len(by_file) >= 2 and set(tensors) == set(reference)
    assert all(torch.equal(tensors[k], v) for k, v in reference.items())


def test_hf_layout_of_a_tied_checkpoint_gets_its_own_lm_head(tiny_dir, tmp_path) -> None:
    """transformers' Janus is written untied; a tied source's embeddings become its lm_head."""
    import transformers

    src = tmp_path / "tied"
    shutil.copytree(tiny_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["language_config"]["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    state = load_file(str(src / "model.safetensors"))
    del state["language_model.lm_head.weight"]
    save_weights(state, src, "safetensors")

    dst = convert_checkpoint(src, tmp_path / "hf", to="hf")  # one shard: embed and head side by side
    hf, info = transformers.JanusForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    embed = state["language_model.model.embed_tokens.weight"]
    assert torch.equal(hf.lm_head.weight, embed) and torch.equal(hf.model.language_model.embed_tokens.weight, embed)
    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()


def test_non_empty_destination_is_refused_unless_forced(bf16_dir, reference, tmp_path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert_checkpoint(bf16_dir, dst)
    # --force replaces only a previous conversion: a folder of someone's files is left alone.
    with pytest.raises(ConvertError, match="does not hold a previous conversion \\(it has no config.json\\)"):
        convert_checkpoint(bf16_dir, dst, force=True)
    assert [p.name for p in dst.iterdir()] == ["notes.txt"] and (dst / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []

    (dst / "notes.txt").unlink()
    convert_checkpoint(bf16_dir, dst)
    (dst / "model.safetensors").write_bytes(b"stale")  # the previous conversion, replaced as a whole
    convert_checkpoint(bf16_dir, dst, force=True)
    tensors, _ = read_output(dst)
    assert all(torch.equal(tensors[k], v) for k, v in reference.items()) and leftovers(tmp_path) == []


def test_empty_destination_is_used(bf16_dir, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    dst = convert_checkpoint(bf16_dir, tmp_path / "out")
    assert (dst / "model.safetensors").is_file()


def test_source_is_never_the_destination(bf16_dir, tmp_path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in bf16_dir.iterdir()}
    with pytest.raises(ConvertError, match="is the source"):
        convert_checkpoint(bf16_dir, bf16_dir, force=True)
    with pytest.raises(ConvertError, match="contains the source"):
        convert_checkpoint(bf16_dir, bf16_dir.parent, force=True)
    assert {p.name: p.stat().st_mtime_ns for p in bf16_dir.iterdir()} == before
    assert leftovers(bf16_dir.parent) == []


def test_bad_sources_write_nothing(bf16_dir, reference, tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        convert_checkpoint(tmp_path / "nope", tmp_path / "out")
    broken = source_in_layout(bf16_dir, {k: v for k, v in reference.items()
                                         if k != "language_model.model.norm.weight"},
                              tmp_path / "broken", "safetensors")
    with pytest.raises(CheckpointError, match=r"missing key 'language_model\.model\.norm\.weight'"):
        convert_checkpoint(broken, tmp_path / "out")
    # A shape error is only found while streaming, after writing began: still nothing is left.
    shrunk = dict(reference, **{"aligner.layers.2.weight": reference["aligner.layers.2.weight"][:, :10]})
    bad_shape = source_in_layout(bf16_dir, shrunk, tmp_path / "bad_shape", "sharded-safetensors")
    with pytest.raises(CheckpointError, match=r"'aligner\.layers\.2\.weight' has shape \(64, 10\)"):
        convert_checkpoint(bad_shape, tmp_path / "out", max_shard_bytes=10**6)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_write_failure_midway_leaves_nothing(bf16_dir, tmp_path, monkeypatch) -> None:
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def fail_on_third(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_third)
    with pytest.raises(ConvertError, match="No space left on device"):
        convert_checkpoint(bf16_dir, tmp_path / "out", max_shard_bytes=10**6)
    assert len(calls) == 3
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unwritable_destination(bf16_dir, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConvertError, match="cannot write to"):
        convert_checkpoint(bf16_dir, tmp_path / "file" / "out")
    with pytest.raises(ConvertError, match="not a directory"):
        convert_checkpoint(bf16_dir, tmp_path / "file")


def test_cli_converts_with_progress_on_stderr(bf16_dir, reference, tmp_path, capsys) -> None:
    dst = tmp_path / "out"
    assert main(["convert", str(bf16_dir), str(dst), "--max-shard-size", "8MB", "--dtype", "keep"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "Converting" in err and f"Wrote {dst}" in err
    tensors, by_file = read_output(dst)
    assert len(by_file) >= 2 and all(torch.equal(tensors[k], v) for k, v in reference.items())


def test_cli_to_hf_writes_what_the_library_writes(tiny_dir, tmp_path) -> None:
    api = convert_checkpoint(tiny_dir, tmp_path / "api", to="hf")
    assert main(["convert", str(tiny_dir), str(tmp_path / "cli"), "--to", "hf"]) == 0
    written = {p.name: p.read_bytes() for p in (tmp_path / "cli").iterdir()}
    assert written == {p.name: p.read_bytes() for p in api.iterdir()}
    assert json.loads(written["config.json"])["architectures"] == ["JanusForConditionalGeneration"]


def test_cli_force_replaces_a_previous_conversion(bf16_dir, reference, tmp_path, capsys) -> None:
    dst = convert_checkpoint(bf16_dir, tmp_path / "out", max_shard_bytes=10**6)  # sharded
    assert any(p.name.startswith("model-") for p in dst.iterdir())
    assert main(["convert", str(bf16_dir), str(dst), "--force"]) == 0
    assert not any(p.name.startswith("model-") for p in dst.iterdir()) and leftovers(tmp_path) == []
    tensors, _ = read_output(dst)
    assert set(tensors) == set(reference) and all(torch.equal(tensors[k], v) for k, v in reference.items())


def test_cli_revision_picks_that_snapshot(bf16_dir, reference, tmp_path, monkeypatch) -> None:
    """A Hub id at --revision v2 converts v2's weights; without it, main's."""
    repo_id, cache = "deepseek-ai/Janus-Pro-1B", tmp_path / "hub"
    make_hub_cache(bf16_dir, cache, repo_id)
    v2 = write_checkpoint(tmp_path / "v2", dtype=torch.bfloat16, seed=8)
    make_hub_cache(v2, cache, repo_id, revision="v2", commit="2" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["convert", repo_id, str(tmp_path / "at-v2"), "--revision", "v2"]) == 0
    assert main(["convert", repo_id, str(tmp_path / "at-main")]) == 0
    at_v2, _ = read_output(tmp_path / "at-v2")
    at_main, _ = read_output(tmp_path / "at-main")
    key = "language_model.lm_head.weight"
    assert torch.equal(at_v2[key], load_file(str(v2 / "model.safetensors"))[key])
    assert torch.equal(at_main[key], reference[key]) and not torch.equal(at_main[key], at_v2[key])


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "no such checkpoint directory"),
    ("not_empty", "is not empty; use --force"),
    ("unwritable", "cannot write to"),
])
def test_cli_errors_are_one_line_and_leave_nothing(bf16_dir, tmp_path, capsys, case, message) -> None:
    src, dst = bf16_dir, tmp_path / "out"
    if case == "missing":
        src = tmp_path / "missing"
    elif case == "not_empty":
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    else:
        (tmp_path / "file").write_text("x")
        dst = tmp_path / "file" / "out"
    assert main(["convert", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("janusvl convert: error:") or "\njanusvl convert: error:" in err
    assert message in err and "Traceback" not in err
    assert leftovers(tmp_path) == []
    if case == "not_empty":
        assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    elif case == "missing":
        assert not dst.exists()


def test_shard_sizes_parse_like_transformers(capsys) -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size("4096") == 4096
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "a", "b", "--max-shard-size", "2XB"])
    assert exit_.value.code == 2 and "2XB" in capsys.readouterr().err


# --- pre-quantised checkpoints (--quantize int8|int4) -------------------------------------------

QUANT_KEYS = {"int8": {"qweight": torch.int8, "scale": torch.float32},
              "int4": {"qweight": torch.uint8, "scales": torch.bfloat16, "lows": torch.bfloat16}}


@pytest.fixture(scope="module")
def quantized(gqa_dir, tmp_path_factory) -> dict[str, Path]:
    """The GQA checkpoint (fp32) converted to bf16 with its decoder quantised, per scheme."""
    out = tmp_path_factory.mktemp("quantized")
    return {s: convert_checkpoint(gqa_dir, out / s, dtype="bfloat16", quantize=s) for s in ("int8", "int4")}


def mapped_files(t: torch.Tensor) -> set[str]:
    """The files whose memory mappings hold `t`'s first byte (empty for anonymous memory)."""
    ptr, files = t.data_ptr(), set()
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= ptr < end and len(fields) > 5:
            files.add(Path(fields[5]).name)
    return files


def decoder_outputs(janus) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of a 40-token prompt (prompt-sized products), of one token per row (decode-sized
    products) and 10 greedy tokens after the prompt."""
    from janusvl.generation.text import generate

    lm = janus.model.language_model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.inference_mode():
        embeds = lm.get_input_embeddings()(ids)
        prompt = lm(inputs_embeds=embeds, attention_mask=mask).logits
        step = lm(inputs_embeds=embeds[:, -1:]).logits
        tokens = generate(lm, embeds, attention_mask=mask, eos_token_id=None, max_new_tokens=10)
    return prompt, step, tokens


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_checkpoint_is_quantising_at_load_bit_for_bit(gqa_dir, quantized, scheme, monkeypatch) -> None:
    """Converting with --quantize and loading gives the layers, logits and greedy tokens of
    quantising the source at load; the stored operands are memory-mapped, and nothing is
    quantised at load."""
    from janusvl import Janus
    from janusvl.models import quant

    dst = quantized[scheme]
    at_load = Janus.from_pretrained(gqa_dir, device="cpu", dtype="bfloat16", quantize=scheme)
    for name in ("quantize_int8", "quantize_int4"):
        monkeypatch.setattr(quant, name, lambda *a: pytest.fail("quantised at load"))
    stored = Janus.from_pretrained(dst, device="cpu")  # dtype and quantisation from config.json
    a, b = at_load.model.language_model, stored.model.language_model
    assert b.quantization == scheme and b.kernel == a.kernel and stored.model.dtype == torch.bfloat16
    layers = {n: m for n, m in b.named_modules() if isinstance(m, quant.QUANTIZERS[scheme])}
    assert len(layers) == 4 * len(b.model.layers) + 1
    for name, layer in layers.items():
        ref = a.get_submodule(name)
        for key, dtype in QUANT_KEYS[scheme].items():
            got = getattr(layer, key)
            assert got.dtype == dtype and torch.equal(got, getattr(ref, key)), (name, key)
            assert mapped_files(got) == {"model.safetensors"}, (name, key)  # read in place, not copied
        assert getattr(layer, "group_size", None) == getattr(ref, "group_size", None)
    for x, y in zip(decoder_outputs(at_load), decoder_outputs(stored), strict=True):
        assert torch.equal(x, y)
    assert at_load.chat("Describe.", max_new_tokens=6).text == stored.chat("Describe.", max_new_tokens=6).text


def test_quantized_checkpoint_keeps_deepseeks_layout_elsewhere_and_its_config_round_trips(gqa_dir, quantized,
                                                                                        tmp_path) -> None:
    from janusvl import JanusConfig
    from janusvl.config import QuantizationConfig

    source = load_file(str(gqa_dir / "model.safetensors"))
    for scheme, dst in quantized.items():
        tensors, _ = read_output(dst)
        projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
        kept = {k for k in source if not any(f"{p}." in k for p in projections)}
        assert kept <= set(tensors) and all(torch.equal(tensors[k], source[k].bfloat16()) for k in kept)
        quantised = set(tensors) - kept
        assert quantised == {f"language_model.{layer}.{name}" for name in QUANT_KEYS[scheme] for layer in
                             ["lm_head"] + [f"model.layers.{i}.{p}" for i in range(2) for p in
                                            ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                             "mlp.down_proj")]}
        config = json.loads((dst / "config.json").read_text())
        want = json.loads((gqa_dir / "config.json").read_text())
        want["torch_dtype"] = want["language_config"]["torch_dtype"] = "bfloat16"
        assert {k: v for k, v in config.items() if k != "quantization_config"} == want
        q = JanusConfig.from_file(dst / "config.json").quantization_config
        modules = {"language_model.model.layers.*.self_attn.qkv_proj": ["q_proj", "k_proj", "v_proj"],
                   "language_model.model.layers.*.self_attn.o_proj": ["o_proj"],
                   "language_model.model.layers.*.mlp.gate_up_proj": ["gate_proj", "up_proj"],
                   "language_model.model.layers.*.mlp.down_proj": ["down_proj"],
                   "language_model.lm_head": ["lm_head"]}
        groups = {"self_attn.qkv_proj": 64, "self_attn.o_proj": 64, "mlp.gate_up_proj": 64,
                  "mlp.down_proj": 32, "lm_head": 64}  # intermediate_size 160: groups of 32
        assert q == QuantizationConfig("janusvl", scheme, modules, groups if scheme == "int4" else None)
        # a plain copy of the quantised checkpoint is lossless, config included, and loads the same
        copy = convert_checkpoint(dst, tmp_path / f"copy-{scheme}", max_shard_bytes=10**6)
        assert small_files(copy) == small_files(dst)
        copied, by_file = read_output(copy)
        assert len(by_file) > 1 and set(copied) == set(tensors)
        assert all(copied[k].dtype == v.dtype and torch.equal(copied[k], v) for k, v in tensors.items())
        model = MultiModalityCausalLM.from_pretrained(copy, device="cpu", dtype="auto")
        assert model.language_model.quantization == scheme


def test_quantized_tied_head_is_quantised_from_the_embedding(bf16_dir, tmp_path) -> None:
    from janusvl import Janus
    from janusvl.models.quant import Int8Linear
    from test_loading import tied_checkpoint

    src = tied_checkpoint(bf16_dir, tmp_path / "tied")
    dst = convert_checkpoint(src, tmp_path / "int8", quantize="int8")
    tensors, _ = read_output(dst)
    embed = "language_model.model.embed_tokens.weight"
    assert "language_model.lm_head.qweight" in tensors and torch.equal(tensors[embed], load_file(
        str(src / "model.safetensors"))[embed])
    at_load, stored = Janus.from_pretrained(src, device="cpu", quantize="int8"), Janus.from_pretrained(dst, device="cpu")
    assert isinstance(stored.model.language_model.lm_head, Int8Linear)
    for x, y in zip(decoder_outputs(at_load), decoder_outputs(stored), strict=True):
        assert torch.equal(x, y)


def test_quantize_refuses_what_it_cannot_honour_and_writes_nothing(bf16_dir, quantized, tmp_path, capsys) -> None:
    dst = tmp_path / "out"
    cases = [
        (dict(src=quantized["int8"], quantize="int4"), "is already quantised (int8); --quantize needs an unquantised"),
        (dict(src=quantized["int4"], quantize="int4"), "is already quantised (int4)"),
        (dict(src=bf16_dir, quantize="int8", to="hf"), "the hf layout has no place"),
        (dict(src=quantized["int8"], to="hf"), "it can only be copied as it is"),
        (dict(src=quantized["int8"], dtype="float32"), "it can only be copied as it is"),
        (dict(src=bf16_dir, quantize="int2"), "quantize must be none, int8 or int4, got 'int2'"),
    ]
    narrow = write_checkpoint(tmp_path / "narrow", dtype=torch.bfloat16, language={"intermediate_size": 144})
    cases.append((dict(src=narrow, quantize="int4"), "language_config.intermediate_size 144 is not a multiple of 32"))
    for kwargs, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            convert_checkpoint(kwargs.pop("src"), dst, **kwargs)
        assert not dst.exists() and leftovers(tmp_path) == []
    assert main(["convert", str(quantized["int8"]), str(dst), "--quantize", "int8"]) == 1
    err = capsys.readouterr().err
    assert "janusvl convert: error:" in err and "already quantised (int8)" in err and "Traceback" not in err
    convert_checkpoint(narrow, dst, quantize="int8")  # int8 has one scale per row: any width
    assert MultiModalityCausalLM.from_pretrained(dst, device="cpu").language_model.quantization == "int8"


def test_quantize_none_is_the_plain_copy(bf16_dir, tmp_path) -> None:
    assert main(["convert", str(bf16_dir), str(tmp_path / "none"), "--quantize", "none"]) == 0
    assert main(["convert", str(bf16_dir), str(tmp_path / "plain")]) == 0
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}  # noqa: E731
    assert files(tmp_path / "none") == files(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "none" / "config.json").read_text())


def test_loading_asks_nothing_and_refuses_a_conflicting_quantize(quantized, monkeypatch, capsys) -> None:
    from janusvl import Janus, benchmark

    dst = quantized["int8"]
    for asked in ("int4", "none"):
        with pytest.raises(InputError, match=f"quantize='{asked}' conflicts with .* stored quantised to int8"):
            Janus.from_pretrained(dst, device="cpu", quantize=asked)
    assert Janus.from_pretrained(dst, device="cpu", quantize="int8").model.language_model.quantization == "int8"
    assert main(["chat", str(dst), "--quantize", "int4", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "quantize='int4' conflicts with" in err and "int8" in err and "Traceback" not in err
    # the bench measures what is stored (its costs follow) and refuses a conflicting --quantize
    seen = []
    monkeypatch.setattr(benchmark, "_spawn", lambda kind, ckpt, opts: seen.append(opts["quantize"]) or {"load_s": 1})
    monkeypatch.setattr(benchmark, "bounds_for", lambda *a: {})
    report = benchmark.run(str(dst), images=False, transformers=True)
    assert seen == ["int8"] and "error" in report["transformers"]
    with pytest.raises(InputError, match="quantize='int4' conflicts"):
        benchmark.run(str(dst), quantize="int4")
    model, _, _ = benchmark._load_janusvl(dst, {"quantize": None, "dtype": "bfloat16"})
    assert model.language_model.quantization == "int8"


def test_int4_checkpoint_is_the_same_on_every_cpu(quantized, tmp_path) -> None:
    """The stored int4 layout is janusvl's own, not torch's CPU-specific packing: loaded where
    janusvl's kernels are off and torch runs its non-vectorised kernels, the same checkpoint
    runs torch's int4 kernel on the same weights, with logits within the activations'
    quantisation error of janusvl's kernel. Earlier int4 checkpoints (torch's packing, marked by
    `int4_packing`) are refused with what to do; int4 needs the CPU."""
    import os
    import subprocess
    import sys

    from janusvl import Janus
    from janusvl.config import JanusConfig
    from janusvl.loading.quantized import check_loadable

    out = tmp_path / "elsewhere.pt"
    code = ("import torch, test_convert; from janusvl import Janus; "
            f"torch.save(test_convert.int4_outputs(Janus.from_pretrained({str(quantized['int4'])!r}, device='cpu')), "
            f"{str(out)!r})")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "JANUSVL_KERNELS": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    elsewhere, here = torch.load(out), int4_outputs(Janus.from_pretrained(quantized["int4"], device="cpu"))
    assert (elsewhere["kernel"], here["kernel"]) == ("int4-torch", "int4-avx2")
    assert torch.equal(elsewhere["weight"], here["weight"])
    assert rel_error(here["logits"], elsewhere["logits"]) < 0.05

    old = copy_without_weights(quantized["int4"], tmp_path / "old")
    raw = json.loads((old / "config.json").read_text())
    raw["quantization_config"]["int4_packing"] = {"cpu_capability": "AVX2", "probe": "0123456789abcdef"}
    (old / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="torch's CPU-specific int4 packing, written by an earlier janusvl; "
                                          "convert its unquantised source again"):
        JanusConfig.from_file(old / "config.json")
    config = JanusConfig.from_file(quantized["int4"] / "config.json")
    with pytest.raises(CheckpointError, match="int4 checkpoints run on the CPU only"):
        check_loadable(config, torch.device("cuda"))
    assert check_loadable(JanusConfig.from_file(quantized["int8"] / "config.json"), torch.device("cuda")).scheme == "int8"


def int4_outputs(janus) -> dict:
    """The decoder's kernel name, its first int4 layer's weights and a short prompt's logits."""
    lm = janus.model.language_model
    ids = torch.arange(3, 27).view(2, 12)
    with torch.inference_mode():
        logits = lm(inputs_embeds=lm.get_input_embeddings()(ids)).logits.float()
    return {"kernel": lm.kernel, "weight": lm.model.layers[0].self_attn.qkv_proj.dequantized(), "logits": logits}


def test_quantized_checkpoint_is_loaded_strictly(quantized, tmp_path) -> None:
    """A stored operand in another dtype, a layer list this version does not write, or another
    tool's quantization_config is refused, naming what is wrong."""
    from safetensors.torch import save_file

    from janusvl import ConfigError

    def edited(name: str, tensors=None, config=None) -> Path:
        dst = copy_without_weights(quantized["int8"], tmp_path / name)
        data = load_file(str(quantized["int8"] / "model.safetensors"))
        save_file(tensors(data) if tensors else data, str(dst / "model.safetensors"))
        if config:
            raw = json.loads((dst / "config.json").read_text())
            config(raw["quantization_config"])
            (dst / "config.json").write_text(json.dumps(raw))
        return dst

    key = "language_model.model.layers.0.mlp.down_proj.scale"
    bad = edited("bf16-scale", tensors=lambda d: {**d, key: d[key].bfloat16()})
    with pytest.raises(CheckpointError, match=re.escape(f"{key!r} is stored as torch.bfloat16, the quantised "
                                                        "layer needs torch.float32")):
        MultiModalityCausalLM.from_pretrained(bad, device="cpu")
    bad = edited("modules", config=lambda q: q["modules"].pop("language_model.lm_head"))
    with pytest.raises(ConfigError, match="are not the layers this janusvl version stores quantised"):
        MultiModalityCausalLM.from_pretrained(bad, device="cpu")
    bad = edited("gptq", config=lambda q: q.update(quant_method="gptq"))
    with pytest.raises(ConfigError, match="quant_method 'gptq' is not supported"):
        MultiModalityCausalLM.from_pretrained(bad, device="cpu")
