"""Checkpoint loading: the four weight layouts, strict key checking, config errors, the Hub cache."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from janusvl import (CheckpointError, CheckpointNotFoundError, ConfigError, JanusConfig,
                     MultiModalityCausalLM, load_pretrained_model)
from janusvl.loading.checkpoint import resolve_device
from janusvl.testing.checkpoint import config_dict, save_weights, write_checkpoint
from conftest import rel_error


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("bf16") / "ckpt", dtype=torch.bfloat16, seed=3)


@pytest.fixture(scope="module")
def reference(bf16_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bf16_dir / "model.safetensors"))


def tied_checkpoint(src: Path, dst: Path) -> Path:
    """`src` with tie_word_embeddings set and no lm_head key, as tied checkpoints are stored."""
    ckpt = edited_checkpoint(src, dst, lambda s: s.pop("language_model.lm_head.weight"))
    config = json.loads((ckpt / "config.json").read_text())
    config["language_config"]["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json" and not f.name.endswith("index.json"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_every_layout_loads_every_weight_exactly(bf16_dir, reference, tmp_path, layout) -> None:
    ckpt = copy_without_weights(bf16_dir, tmp_path / layout)
    files = save_weights(reference, ckpt, layout, shards=3)
    assert len(files) == (3 if layout.startswith("sharded") else 1)
    model = MultiModalityCausalLM.from_pretrained(ckpt, device="cpu", dtype="auto")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    state = model.state_dict()
    used = {k: v for k, v in reference.items() if "attn_pool" not in k and "codebook_used" not in k}
    assert set(state) == set(used)
    for key, value in used.items():
        assert torch.equal(state[key], value), key
    assert not any(t.is_meta for t in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("cuda,mps,want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda: bool, mps: bool, want: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == resolve_device(None) == torch.device(want)


def test_dtype_and_device_options(bf16_dir, reference) -> None:
    model = MultiModalityCausalLM.from_pretrained(bf16_dir, device="auto", dtype="float32")
    assert model.dtype == torch.float32 and model.device == resolve_device("auto")
    model = MultiModalityCausalLM.from_pretrained(bf16_dir, device="cpu", dtype="float32")
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[key], reference[key].float())
    with pytest.raises(ValueError, match="float8"):
        MultiModalityCausalLM.from_pretrained(bf16_dir, dtype="float8")


@pytest.mark.parametrize("dtype", ["float16", torch.float16])
def test_float16_loading(bf16_dir, reference, dtype) -> None:
    """Every floating weight is the checkpoint's, cast to float16; the decoder runs in it."""
    model = MultiModalityCausalLM.from_pretrained(bf16_dir, device="cpu", dtype=dtype)
    assert model.dtype == torch.float16
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key].to(torch.float16)), key
    fp32 = MultiModalityCausalLM.from_pretrained(bf16_dir, device="cpu", dtype="float32")
    ids = torch.randint(0, 600, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        half = model.language_model(input_ids=ids).logits
        full = fp32.language_model(input_ids=ids).logits
    assert half.dtype == torch.float16
    assert rel_error(half, full) < 0.005  # float16 rounding (10-bit mantissa): 0.14% here


def test_load_pretrained_model_returns_deepseeks_triple(bf16_dir) -> None:
    tokenizer, processor, model = load_pretrained_model(bf16_dir)
    assert processor.tokenizer is tokenizer
    assert model.dtype == torch.bfloat16
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id


def edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    ckpt = copy_without_weights(src, dst)
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(ckpt / "model.safetensors"))
    return ckpt


def test_missing_key_is_named(bf16_dir, tmp_path) -> None:
    ckpt = edited_checkpoint(bf16_dir, tmp_path / "c", lambda s: s.pop("language_model.model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing key 'language_model\.model\.norm\.weight'.*model\.safetensors"):
        MultiModalityCausalLM.from_pretrained(ckpt, device="cpu")


def test_unexpected_key_is_named(bf16_dir, tmp_path) -> None:
    def add(s):
        s["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    ckpt = edited_checkpoint(bf16_dir, tmp_path / "c", add)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key 'language_model\.model\.layers\.9"):
        MultiModalityCausalLM.from_pretrained(ckpt, device="cpu")


def test_shape_mismatch_is_named(bf16_dir, tmp_path) -> None:
    def shrink(s):
        s["aligner.layers.2.weight"] = s["aligner.layers.2.weight"][:, :10].contiguous()
    ckpt = edited_checkpoint(bf16_dir, tmp_path / "c", shrink)
    with pytest.raises(CheckpointError, match=r"'aligner\.layers\.2\.weight' has shape \(64, 10\), the model expects \(64, 64\)"):
        MultiModalityCausalLM.from_pretrained(ckpt, device="cpu")


def test_unused_groups_are_required_by_name_only(bf16_dir, reference, tmp_path) -> None:
    """attn_pool.* and codebook_used may be present (as published) or absent; nothing else may,
    not even a key that merely looks like them."""
    def drop(s):
        for k in [k for k in s if "attn_pool" in k or k.endswith("codebook_used")]:
            s.pop(k)
    ckpt = edited_checkpoint(bf16_dir, tmp_path / "c", drop)
    state = MultiModalityCausalLM.from_pretrained(ckpt, device="cpu").state_dict()
    assert state.keys() == {k for k in reference if "attn_pool" not in k and "codebook_used" not in k}
    assert all(torch.equal(v, reference[k]) for k, v in state.items())
    for lookalike in ("vision_model.vision_tower.attn_pooling.latent", "gen_vision_model.quantize.codebook_used2",
                      "vision_model.attn_pool.latent"):
        bad = edited_checkpoint(bf16_dir, tmp_path / lookalike, lambda s: s.update({lookalike: torch.zeros(2)}))
        with pytest.raises(CheckpointError, match=rf"unexpected key '{re.escape(lookalike)}'"):
            MultiModalityCausalLM.from_pretrained(bad, device="cpu")


def test_tied_embeddings_load_as_one_tensor(bf16_dir, reference, tmp_path) -> None:
    """tie_word_embeddings: no lm_head key is stored; the head is the embedding itself, and the
    model computes what an untied checkpoint with lm_head = embeddings computes."""
    tied = tied_checkpoint(bf16_dir, tmp_path / "tied")
    untied = edited_checkpoint(bf16_dir, tmp_path / "untied", lambda s: s.update(
        {"language_model.lm_head.weight": s["language_model.model.embed_tokens.weight"].clone()}))
    a = MultiModalityCausalLM.from_pretrained(tied, device="cpu", dtype="float32")
    b = MultiModalityCausalLM.from_pretrained(untied, device="cpu", dtype="float32")
    lm = a.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert torch.equal(lm.lm_head.weight, reference["language_model.model.embed_tokens.weight"].float())
    ids = torch.randint(0, 600, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(lm(input_ids=ids).logits, b.language_model(input_ids=ids).logits)


def test_index_naming_a_missing_shard(bf16_dir, reference, tmp_path) -> None:
    ckpt = copy_without_weights(bf16_dir, tmp_path / "c")
    files = save_weights(reference, ckpt, "sharded-safetensors", shards=2)
    files[1].unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json names shard '{files[1].name}'"):
        MultiModalityCausalLM.from_pretrained(ckpt, device="cpu")


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_weights_file(bf16_dir, reference, tmp_path, name) -> None:
    ckpt = copy_without_weights(bf16_dir, tmp_path / "c")
    (path,) = save_weights(reference, ckpt, "safetensors" if name.endswith("safetensors") else "bin")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{name}: cannot read weights"):
        MultiModalityCausalLM.from_pretrained(ckpt, device="cpu")


def test_no_weights_at_all(bf16_dir, tmp_path) -> None:
    ckpt = copy_without_weights(bf16_dir, tmp_path / "c")
    with pytest.raises(CheckpointError, match="no weights found"):
        MultiModalityCausalLM.from_pretrained(ckpt, device="cpu")


def test_directory_without_config(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json"):
        MultiModalityCausalLM.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize(("section", "field", "value"), [
    (None, "model_type", "llava"),
    ("vision_config", "cls", "EVAVisionTower"),
    ("aligner_config", "cls", "QFormer"),
    ("gen_vision_config", "cls", "VQ-32"),
    ("gen_head_config", "cls", "head"),
    ("aligner_config", "projector_type", "low_high_hybrid_split_mlp_gelu"),
    ("vision_config", "model_name", "siglip_huge"),
])
def test_unknown_config_values_are_named(section, field, value) -> None:
    data = config_dict("tiny", vocab_size=640)
    target = data if section is None else data[section]
    if field in ("projector_type", "model_name"):
        target = target["params"]
    target[field] = value
    with pytest.raises(ConfigError, match=rf"{field}.*{value!r}".replace("(", r"\(").replace(")", r"\)")):
        JanusConfig.from_dict(data)


def test_pro_7b_config_takes_llama_defaults() -> None:
    cfg = JanusConfig.from_dict(config_dict("pro-7b", vocab_size=102400)).language_config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (4096, 11008, 32, 32)
    assert (cfg.num_hidden_layers, cfg.vocab_size, cfg.max_position_embeddings) == (30, 102400, 16384)
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000.0 and cfg.head_dim == 128


def test_select_layer_semantics() -> None:
    """DeepSeek's tower keeps min(L, L + select_layer + 1) blocks for select_layer <= 0 and
    min(L, select_layer) above; a selection below the first layer cannot be built."""
    data = config_dict("pro-1b", vocab_size=102400)
    blocks = {}
    for sel in (-1, -2, 0, 1, 5, 24, 30, -24, -25):
        data["vision_config"]["params"]["select_layer"] = sel
        blocks[sel] = JanusConfig.from_dict(data).vision_config.num_blocks
    assert blocks == {-1: 24, -2: 23, 0: 24, 1: 1, 5: 5, 24: 24, 30: 24, -24: 1, -25: 0}
    for sel in (-26, -30):
        data["vision_config"]["params"]["select_layer"] = sel
        with pytest.raises(ConfigError, match=rf"select_layer {sel} selects no layer.*>= -25"):
            JanusConfig.from_dict(data)


def test_config_is_frozen() -> None:
    cfg = JanusConfig.from_dict(config_dict("tiny", vocab_size=640))
    with pytest.raises(AttributeError):
        cfg.language_config.hidden_size = 3  # type: ignore[misc]


def make_hub_cache(src: Path, cache: Path, repo_id: str, revision: str = "main", commit: str = "0" * 40) -> Path:
    """Lay `src` out as huggingface_hub's cache does for `repo_id` at `revision` (a branch or tag
    naming `commit`); call again with other revisions to add them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


def test_hub_id_resolves_from_the_cache_offline(bf16_dir, tmp_path, monkeypatch) -> None:
    make_hub_cache(bf16_dir, tmp_path / "hub", "deepseek-ai/Janus-Pro-1B")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer, processor, model = load_pretrained_model("deepseek-ai/Janus-Pro-1B", device="cpu")
    assert model.checkpoint_path.parts[-2] == "snapshots"
    assert processor.image_id == tokenizer.vocab["<image_placeholder>"]


def test_hub_id_not_cached_offline_says_what_to_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError) as err:
        MultiModalityCausalLM.from_pretrained("deepseek-ai/Janus-Pro-7B")
    msg = str(err.value)
    assert "deepseek-ai/Janus-Pro-7B" in msg and str(tmp_path / "empty") in msg and "HF_HUB_OFFLINE" in msg


def test_missing_local_path_is_named(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint directory"):
        MultiModalityCausalLM.from_pretrained(tmp_path / "nope" / "deeper")


def test_unavailable_or_unknown_device_is_a_clear_error(bf16_dir) -> None:
    from janusvl import InputError
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="'cuda'.*no CUDA device"):
            MultiModalityCausalLM.from_pretrained(bf16_dir, device="cuda")
    with pytest.raises(InputError, match="'gpu0' is not a device name"):
        MultiModalityCausalLM.from_pretrained(bf16_dir, device="gpu0")
