"""transformers' loading calls as DeepSeek's scripts make them (`AutoConfig`,
`AutoModelForCausalLM`) and the dtype each entry point loads in, on a checkpoint whose config says
bfloat16 while its weights are float32 (where loading in the config's dtype gives other numbers)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from janusvl import (AutoConfig, AutoModelForCausalLM, CheckpointError, ConfigError, InputError, Janus,
                     MultiModalityCausalLM, load_pretrained_model)
from janusvl.testing.checkpoint import write_checkpoint

KEY = "language_model.model.embed_tokens.weight"  # kept as loaded by every entry point (the fast paths fuse projections)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.json says bfloat16; the stored weights are float32."""
    return write_checkpoint(tmp_path_factory.mktemp("mixed") / "ckpt", dtype=torch.float32,
                            config_dtype=torch.bfloat16, seed=5)


@pytest.fixture(scope="module")
def stored(mixed_dir: Path) -> torch.Tensor:
    return load_file(str(mixed_dir / "model.safetensors"))[KEY]


def weight(model: MultiModalityCausalLM) -> torch.Tensor:
    return model.state_dict()[KEY]


def test_each_entry_point_loads_in_deepseeks_dtype(mixed_dir, stored) -> None:
    assert json.loads((mixed_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert stored.dtype == torch.float32 and not torch.equal(stored, stored.bfloat16().float())
    # transformers 4.x (DeepSeek's loader) gives float32 on the CPU unless told otherwise
    for model in (AutoModelForCausalLM.from_pretrained(mixed_dir, trust_remote_code=True),
                  MultiModalityCausalLM.from_pretrained(mixed_dir)):
        assert model.dtype == torch.float32 and model.device.type == "cpu"
        assert torch.equal(weight(model), stored)
    # DeepSeek's CPU demo casts that to float16: one rounding, not bf16 then fp16
    fp16 = AutoModelForCausalLM.from_pretrained(mixed_dir).to(torch.float16)
    assert torch.equal(weight(fp16), stored.half()) and not torch.equal(weight(fp16), stored.bfloat16().half())
    given = AutoModelForCausalLM.from_pretrained(mixed_dir, torch_dtype=torch.float16, device_map="cpu")
    assert torch.equal(weight(given), stored.half())
    # "auto" keeps the checkpoint's own dtype, as Janus.from_pretrained does by default
    for model in (AutoModelForCausalLM.from_pretrained(mixed_dir, torch_dtype="auto"),
                  MultiModalityCausalLM.from_pretrained(mixed_dir, dtype="auto"),
                  Janus.from_pretrained(mixed_dir, device="cpu").model):
        assert torch.equal(weight(model), stored.bfloat16())
    # DeepSeek's load_pretrained_model casts to bfloat16 (`vl_gpt.to(torch.bfloat16).cuda()`)
    _, _, model = load_pretrained_model(mixed_dir, device="cpu")
    assert torch.equal(weight(model), stored.bfloat16())


def test_edited_language_config_is_honoured_without_mutating_configs(mixed_dir) -> None:
    config = AutoConfig.from_pretrained(mixed_dir, trust_remote_code=True)
    language_config = config.language_config
    assert language_config._attn_implementation == "sdpa"  # what janusvl runs when unset
    assert (language_config.hidden_size, language_config.rope_theta) == (64, 10000.0)  # a default
    language_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_pretrained(mixed_dir, language_config=language_config,
                                                 trust_remote_code=True)
    assert model.config.raw["language_config"]["_attn_implementation"] == "eager"
    before = json.loads((mixed_dir / "config.json").read_text())
    language_config.num_hidden_layers = 1  # an edit after loading changes nothing loaded ...
    assert len(model.language_model.model.layers) == 2
    assert json.loads((mixed_dir / "config.json").read_text()) == before
    with pytest.raises(AttributeError):
        model.config.language_config.num_hidden_layers = 1  # type: ignore[misc]
    # ... and reaches the next load: one layer, so the checkpoint's second is an unexpected key
    with pytest.raises(CheckpointError, match=r"unexpected key 'language_model\.model\.layers\.1\."):
        AutoModelForCausalLM.from_pretrained(mixed_dir, config=config)
    copied = copy.deepcopy(config)
    copied.language_config.num_hidden_layers = 2
    assert config.language_config.num_hidden_layers == 1
    assert AutoModelForCausalLM.from_pretrained(mixed_dir, config=copied).config.language_config.num_hidden_layers == 2


def test_pro_7b_language_config_reads_llama_defaults(tmp_path) -> None:
    from janusvl.testing.checkpoint import config_dict

    (tmp_path / "config.json").write_text(json.dumps(config_dict("pro-7b", vocab_size=102400)))
    language_config = AutoConfig.from_pretrained(tmp_path).language_config
    assert (language_config.hidden_size, language_config.num_hidden_layers) == (4096, 30)
    assert "hidden_size" not in language_config.to_dict()  # only config.json's own keys go back


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flash_attention_2"])
def test_every_attention_implementation_gives_transformers_eager_numbers(tiny_dir, tiny, hf_model,
                                                                         implementation) -> None:
    """janusvl computes every implementation with SDPA; transformers' eager attention (what
    DeepSeek's demos ask for) agrees within fp32 rounding."""
    _, processor, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=implementation)
    eager = copy.deepcopy(hf_model)
    eager.set_attn_implementation("eager")
    batch = processor(conversations=[{"role": "<|User|>", "content": "Name three colours."},
                                     {"role": "<|Assistant|>", "content": ""}])
    with torch.no_grad():
        ours = model.language_model(inputs_embeds=model.prepare_inputs_embeds(**batch)).logits
        theirs = eager(input_ids=batch.input_ids).logits
    assert eager.config.text_config._attn_implementation == "eager"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5 * theirs.abs().max().item())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"load_in_8bit": True, "quantization_config": {}}, r"unsupported arguments 'load_in_8bit', 'quantization_config'"),
    ({"use_safetensors": True}, r"unsupported argument 'use_safetensors'; janusvl takes .*torch_dtype"),
    ({"device_map": {"vision_model": "cpu", "language_model": "cuda:0"}}, r"device_map places modules on \['cpu', 'cuda:0'\]"),
    ({"device_map": "gpu0"}, r"'gpu0' is not a device name"),
    ({"torch_dtype": torch.float16, "dtype": "bfloat16"}, r"dtype='bfloat16' and torch_dtype=torch\.float16 disagree"),
    ({"torch_dtype": "float8"}, r"dtype 'float8' is not supported"),
    ({"language_config": 12}, r"language_config must be a config from janusvl\.AutoConfig or a dict"),
])
def test_unsupported_arguments_are_named(mixed_dir, kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        AutoModelForCausalLM.from_pretrained(mixed_dir, **kwargs)


def test_unsupported_config_values_are_named(mixed_dir) -> None:
    language_config = AutoConfig.from_pretrained(mixed_dir).language_config
    language_config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match=r"given to from_pretrained.*_attn_implementation 'flex_attention'"):
        AutoModelForCausalLM.from_pretrained(mixed_dir, language_config=language_config)
    with pytest.raises(InputError, match=r"AutoConfig\.from_pretrained: unsupported argument 'output_hidden_states'"):
        AutoConfig.from_pretrained(mixed_dir, output_hidden_states=True)
    with pytest.raises(InputError, match="positional"):
        AutoModelForCausalLM.from_pretrained(mixed_dir, language_config)
    with pytest.raises(AttributeError, match="no key 'nope'"):
        _ = language_config.nope
