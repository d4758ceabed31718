"""Hostile files and commands: checkpoints that point outside themselves, configs that cannot
build a model, NaN weights, `convert --force` over other people's files, escape sequences in
model output, and command-line values the library would refuse."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from janusvl import CheckpointError, ConfigError, JanusConfig, MultiModalityCausalLM, VLChatProcessor
from janusvl.cli import main
from janusvl.cli.common import terminal_safe, write_stream
from janusvl.loading.checkpoint import check_finite, load_model
from janusvl.loading.convert import ConvertError, convert_checkpoint
from janusvl.testing.checkpoint import config_dict, save_weights
from test_loading import bf16_dir, copy_without_weights, reference  # noqa: F401 - shared fixtures


def sharded(src: Path, state: dict[str, torch.Tensor], dst: Path) -> tuple[Path, dict]:
    """`src` as two safetensors shards; returns the directory and its index (to edit)."""
    root = copy_without_weights(src, dst)
    save_weights(state, root, "sharded-safetensors", shards=2)
    return root, json.loads((root / "model.safetensors.index.json").read_text())


def write_index(root: Path, index: dict) -> None:
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


# --- shard paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_an_index_cannot_name_a_file_outside_the_checkpoint(bf16_dir, reference, tmp_path: Path, where: str) -> None:
    root, index = sharded(bf16_dir, reference, tmp_path / "c")
    second = sorted(set(index["weight_map"].values()))[1]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(root / second, outside)  # the shard now lives beside the checkpoint, not in it
    if where == "parent":
        name = "../elsewhere.safetensors"
    elif where == "absolute":
        name = str(outside)
    else:
        name = "link.safetensors"
        (root / name).symlink_to(outside)
    index["weight_map"] = {k: (name if v == second else v) for k, v in index["weight_map"].items()}
    write_index(root, index)
    with pytest.raises(CheckpointError, match=rf"names shard '{name}', which is outside the checkpoint directory"):
        load_model(root, device="cpu")


def test_an_index_with_odd_values_is_a_checkpoint_error(bf16_dir, reference, tmp_path: Path) -> None:
    root, index = sharded(bf16_dir, reference, tmp_path / "c")
    index["weight_map"] = {k: ["list"] for k in index["weight_map"]}
    write_index(root, index)
    with pytest.raises(CheckpointError, match=r"shard names must be non-empty strings, got \['list'\]"):
        load_model(root, device="cpu")


def test_hub_cache_symlinks_into_its_blob_store_still_load(bf16_dir, reference, tmp_path: Path) -> None:
    """huggingface_hub's snapshots are symlinks into ../../blobs: that is not an escape."""
    built, _ = sharded(bf16_dir, reference, tmp_path / "built")
    repo = tmp_path / "hub" / "models--deepseek-ai--Janus-Pro-1B"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in built.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    model = load_model(snapshot, device="cpu", dtype="auto")
    assert torch.equal(model.language_model.lm_head.weight, reference["language_model.lm_head.weight"])


# --- configs ----------------------------------------------------------------------------------------

def edited_config(edit) -> dict:
    data = config_dict("tiny", vocab_size=640)
    edit(data)
    return data


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["language_config"].update(num_attention_heads=0),
     r"language_config\.num_attention_heads must be in \[1, 1024\], got 0"),
    (lambda d: d["language_config"].update(hidden_size=-64), r"language_config\.hidden_size must be in .*got -64"),
    (lambda d: d["language_config"].update(num_attention_heads=6),
     r"language_config\.hidden_size 64 is not a multiple of num_attention_heads 6"),
    (lambda d: d["language_config"].update(num_key_value_heads=3),
     r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (lambda d: d["language_config"].update(max_position_embeddings=10**12),
     r"language_config\.max_position_embeddings must be in \[1, 2097152\], got 1000000000000"),
    (lambda d: d["language_config"].update(rope_theta=-1.0), r"language_config\.rope_theta must be a positive number"),
    (lambda d: d["vision_config"]["params"].update(image_size=0), r"vision_config\.params\.image_size must be in"),
    (lambda d: d["aligner_config"]["params"].update(n_embed=32),
     r"aligner_config\.params\.n_embed 32 disagrees with language_config\.hidden_size 64"),
    (lambda d: d["gen_head_config"]["params"].update(image_token_size=100),
     r"gen_head_config\.params\.image_token_size 100 disagrees with gen_vision_config\.params\.image_token_size 16384"),
    (lambda d: d["gen_vision_config"]["params"].update(base_channels=24),
     r"gen_vision_config\.params\.base_channels 24 x channel_multiplier 1 is not a multiple of 32"),
    (lambda d: d["gen_vision_config"]["params"].update(channel_multiplier=["x"]),
     r"gen_vision_config\.params\.channel_multiplier must be a list"),
    (lambda d: d["gen_aligner_config"]["params"].update(depth=0), r"gen_aligner_config\.params\.depth must be in \[1, 64\]"),
])
def test_configs_are_validated_across_fields(edit, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JanusConfig.from_dict(edited_config(edit))


@pytest.mark.parametrize("tokens", [100, 10**12])
def test_num_image_tokens_must_match_the_vision_tower(bf16_dir, tmp_path: Path, tokens: int) -> None:
    root = copy_without_weights(bf16_dir, tmp_path / "c")
    processor_config = json.loads((root / "processor_config.json").read_text())
    (root / "processor_config.json").write_text(json.dumps({**processor_config, "num_image_tokens": tokens}))
    with pytest.raises(ConfigError, match=rf"num_image_tokens {tokens} disagrees with the vision tower in "
                                          r"config\.json: \(image_size 384 / patch size 16\)\^2 = 576"):
        VLChatProcessor.from_pretrained(root)


def test_preprocessor_image_size_must_match_the_vision_tower(bf16_dir, tmp_path: Path) -> None:
    root = copy_without_weights(bf16_dir, tmp_path / "c")
    pre = json.loads((root / "preprocessor_config.json").read_text())
    (root / "preprocessor_config.json").write_text(json.dumps({**pre, "image_size": 512}))
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json image_size 512 disagrees with config\.json"):
        VLChatProcessor.from_pretrained(root)


# --- non-finite weights ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_by_name(bf16_dir, reference, tmp_path: Path, bad: float) -> None:
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    edited = dict(reference)
    edited[key] = reference[key].clone()
    edited[key][3, 5] = bad
    root = copy_without_weights(bf16_dir, tmp_path / "c")
    save_file(edited, str(root / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: '{key}' holds NaN or infinite values; "
                                              "pass allow_nonfinite=True"):
        MultiModalityCausalLM.from_pretrained(root, dtype="auto")
    model = MultiModalityCausalLM.from_pretrained(root, dtype="auto", allow_nonfinite=True)
    weight = model.language_model.model.layers[1].mlp.up_proj.weight
    assert weight[3, 5].item() == bad or (bad != bad and weight[3, 5].isnan())


def test_a_sum_that_overflows_is_not_mistaken_for_infinity() -> None:
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # finite, but sums past float16's range
    check_finite(Path("x"), "big", big)
    big[7] = float("nan")
    with pytest.raises(CheckpointError, match="'big' holds NaN"):
        check_finite(Path("x"), "big", big)
    check_finite(Path("x"), "ids", torch.tensor([1, 2, 3]))  # integer tensors have nothing to check


# --- convert --force ------------------------------------------------------------------------------

def test_force_never_deletes_a_folder_of_other_files(bf16_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    work = tmp_path / "project"
    work.mkdir()
    for name in ("main.py", "notes.txt", "config.json"):
        (work / name).write_text(name)
    monkeypatch.chdir(work)
    assert main(["convert", str(bf16_dir), ".", "--force"]) == 1
    err = capsys.readouterr().err
    assert "does not hold a previous conversion (it holds 'main.py', which a conversion does not write)" in err
    assert sorted(p.name for p in work.iterdir()) == ["config.json", "main.py", "notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("extra", "reason"), [
    ("photo.jpg", "it holds 'photo.jpg'"),
    ("sub/", "it holds 'sub'"),
])
def test_a_previous_conversion_with_anything_else_is_kept(bf16_dir, tmp_path: Path, extra: str, reason: str) -> None:
    dst = convert_checkpoint(bf16_dir, tmp_path / "out")
    if extra.endswith("/"):
        (dst / extra).mkdir()
    else:
        (dst / extra).write_bytes(b"mine")
    before = sorted(p.name for p in dst.iterdir())
    with pytest.raises(ConvertError, match=rf"\({reason}, which a conversion does not write\)"):
        convert_checkpoint(bf16_dir, dst, force=True)
    assert sorted(p.name for p in dst.iterdir()) == before


def test_force_needs_config_and_weights(bf16_dir, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match=r"\(it has no model\.safetensors or model\.safetensors\.index\.json\)"):
        convert_checkpoint(bf16_dir, dst, force=True)
    assert [p.name for p in dst.iterdir()] == ["config.json"]


# --- terminal output --------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


HOSTILE = "Hi\x1b[2J\x1b]0;pwned\x07 there\r\x08!\tok\n\u202eevil\x9b31m"


def test_model_output_is_defused_on_a_terminal(monkeypatch) -> None:
    assert terminal_safe(HOSTILE) == "Hi there!\tok\nevil31m"
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    write_stream(["Hi\x1b", "[2J there"])  # a sequence split across chunks loses its ESC too
    assert screen.getvalue() == "Hi[2J there\n"
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    write_stream([HOSTILE])  # into a pipe or a file the text is the model's, byte for byte
    assert piped.getvalue() == HOSTILE + "\n"


# --- command-line values ------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "message"), [
    (["chat", "M", "--top-k", "2.7", "hi"], "argument --top-k: invalid int value: '2.7'"),
    (["chat", "M", "--seed", str(2**70), "hi"], f"argument --seed: must be at most {2**63 - 1}"),
    (["chat", "M", "--max-image-pixels", "0", "hi"], "argument --max-image-pixels: must be >= 1, got 0"),
    (["imagine", "M", "p", "-n", "65"], "argument -n/--num-images: expected at most 64 images per run"),
    (["imagine", "M", "p", "--cfg-weight", "1e30"], "argument --cfg-weight: expected at most 100"),
    (["imagine", "M", "p", "--temperature", "1e-9"], "argument --temperature: expected at least 1e-05"),
])
def test_usage_errors_name_the_flag(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "nan"], "janusvl chat: error: --temperature must be a finite number, got nan"),
    (["--temperature", "1e-9"], "janusvl chat: error: --temperature must be 0 (greedy) or at least 1e-05"),
    (["--top-p", "1.5"], "janusvl chat: error: --top-p must be in (0, 1], got 1.5"),
])
def test_chat_values_fail_before_loading(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    assert main(["chat", str(tmp_path / "never-loaded"), *flags, "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and "Loading" not in err


def test_chat_image_limit_applies_before_loading(tmp_path: Path, capsys) -> None:
    from PIL import Image

    Image.new("RGB", (30, 30)).save(tmp_path / "a.png")
    assert main(["chat", str(tmp_path / "never-loaded"), "--image", str(tmp_path / "a.png"),
                 "--max-image-pixels", "100", "hi"]) == 1
    err = capsys.readouterr().err
    assert "30x30 is 900 pixels, more than max_image_pixels (100)" in err and "Loading" not in err
