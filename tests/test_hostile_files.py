"""Hostile files and commands: checkpoints that point outside themselves, NaN weights,
`convert --force` over other people's files, escape sequences in model output. Configs that
cannot build a model and command-line values the library would refuse are rows of
tests/hostile_cases.py (run by test_hostile_corpus.py)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from janusvl import CheckpointError, MultiModalityCausalLM
from janusvl.cli import main
from janusvl.cli.common import terminal_safe, write_stream
from janusvl.loading.checkpoint import check_finite, load_model
from janusvl.loading.convert import ConvertError, convert_checkpoint
from janusvl.testing.checkpoint import save_weights
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
