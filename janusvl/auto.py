"""transformers' loading calls, as DeepSeek's scripts make them: `AutoConfig` and
`AutoModelForCausalLM`, giving janusvl's `MultiModalityCausalLM`.

DeepSeek's scripts and demos load Janus with

    config = AutoConfig.from_pretrained(model_path)
    language_config = config.language_config
    language_config._attn_implementation = 'eager'
    vl_gpt = AutoModelForCausalLM.from_pretrained(model_path, language_config=language_config,
                                                  trust_remote_code=True)

and get the weights in transformers 4.x's default dtype, float32, on the CPU. These classes take
the same calls and load the same way: float32 unless `torch_dtype` (or `dtype`) says otherwise
("auto" keeps the checkpoint's dtype), on the CPU unless `device_map` names a device.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import JanusConfig, LanguageConfig
from .errors import ConfigError, InputError
from .models.janus import MultiModalityCausalLM

# What `_attn_implementation` reads as when config.json does not set it: what janusvl runs.
DEFAULT_ATTN = "sdpa"

# transformers arguments that change nothing here: janusvl runs its own code, and always loads
# one tensor at a time.
IGNORED = ("trust_remote_code", "low_cpu_mem_usage")


class EditableConfig:
    """An editable copy of a config.json object whose keys read and write as attributes, like
    transformers' configs (DeepSeek's demos set `config.language_config._attn_implementation`).

    janusvl's own configs stay frozen: `from_pretrained` builds a new `JanusConfig` from this
    copy, so editing it afterwards changes no loaded model. `language_config` also reads the
    LLaMA defaults for keys config.json leaves out (Janus-Pro-7B's `hidden_size` reads 4096)."""

    def __init__(self, data: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> None:
        items = {k: EditableConfig(v) if isinstance(v, Mapping) else copy.deepcopy(v) for k, v in data.items()}
        object.__setattr__(self, "_items", items)
        object.__setattr__(self, "_defaults", dict(defaults or {}))

    def __getattr__(self, name: str) -> Any:
        items, defaults = self.__dict__.get("_items", {}), self.__dict__.get("_defaults", {})
        if name in items:
            return items[name]
        if name in defaults:
            return defaults[name]
        raise AttributeError(f"config has no key {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self._items[name] = value

    def __delattr__(self, name: str) -> None:
        if name not in self._items:
            raise AttributeError(f"config has no key {name!r}")
        del self._items[name]

    def to_dict(self) -> dict[str, Any]:
        """The keys as config.json would hold them (set ones only, not the read-only defaults)."""
        return {k: v.to_dict() if isinstance(v, EditableConfig) else copy.deepcopy(v)
                for k, v in self._items.items()}

    def __repr__(self) -> str:
        return f"EditableConfig({self.to_dict()!r})"


def editable(config: JanusConfig) -> EditableConfig:
    """The editable copy of `config`'s config.json, with the LLaMA defaults behind language_config."""
    view = EditableConfig(config.raw)
    defaults = {**dataclasses.asdict(config.language_config), "_attn_implementation": DEFAULT_ATTN}
    view.language_config = EditableConfig(config.raw["language_config"], defaults)
    return view


def _unsupported(caller: str, names: list[str], supported: list[str]) -> InputError:
    plural = "s" if len(names) > 1 else ""
    return InputError(f"{caller}: unsupported argument{plural} {', '.join(map(repr, sorted(names)))}; "
                      f"janusvl takes {', '.join(supported)}")


def _as_dict(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, EditableConfig):
        return value.to_dict()
    if isinstance(value, LanguageConfig):
        return dataclasses.asdict(value)
    if isinstance(value, JanusConfig):
        return copy.deepcopy(value.raw)
    if isinstance(value, Mapping):
        return copy.deepcopy(dict(value))
    raise InputError(f"{name} must be a config from janusvl.AutoConfig or a dict, got {type(value).__name__}")


def _either(caller: str, names: tuple[str, str], a: Any, b: Any) -> Any:
    if a is not None and b is not None and a != b:
        raise InputError(f"{caller}: {names[0]}={a!r} and {names[1]}={b!r} disagree; pass one of them")
    return a if a is not None else b


def _device(caller: str, device_map: Any) -> Any:
    """transformers' device_map for one device: None (the CPU), a device, an index, or a map
    whose every entry is the same device."""
    if device_map is None:
        return "cpu"
    if isinstance(device_map, Mapping):
        targets = {str(v) for v in device_map.values()}
        if len(targets) != 1:
            raise InputError(f"{caller}: device_map places modules on {sorted(targets)}; janusvl loads "
                             "the whole model on one device")
        device_map = next(iter(device_map.values()))
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return f"cuda:{device_map}"
    return device_map


def deepseek_from_pretrained(caller: str, model_path: str | Path, device: Any = None, dtype: Any = None,
                    **kwargs: Any) -> MultiModalityCausalLM:
    """DeepSeek's loading call: float32 unless a dtype is given ("auto": the checkpoint's own),
    on the CPU unless a device is given ("auto": cuda, mps, then cpu). Accepts transformers'
    names `torch_dtype`, `device_map`, `config`, `language_config`, `attn_implementation`,
    `revision`, and janusvl's `allow_nonfinite` (load weights holding NaN or infinity);
    `trust_remote_code` and `low_cpu_mem_usage` change nothing; anything else is an InputError
    naming it."""
    from .loading.checkpoint import load_model
    from .loading.hub import resolve_checkpoint

    supported = ["device", "dtype", "torch_dtype", "device_map", "config", "language_config",
                 "attn_implementation", "revision", "allow_nonfinite", *IGNORED]
    unknown = [k for k in kwargs if k not in supported]
    if unknown:
        raise _unsupported(caller, unknown, supported)
    dtype = _either(caller, ("dtype", "torch_dtype"), dtype, kwargs.get("torch_dtype"))
    device = _device(caller, _either(caller, ("device", "device_map"), device, kwargs.get("device_map")))
    root = resolve_checkpoint(model_path, kwargs.get("revision"))
    config = None
    if any(kwargs.get(k) is not None for k in ("config", "language_config", "attn_implementation")):
        config = _edited_config(root, kwargs)
    return load_model(root, device=device, dtype=torch.float32 if dtype is None else dtype,
                      revision=kwargs.get("revision"), config=config,
                      allow_nonfinite=bool(kwargs.get("allow_nonfinite", False)))


def _edited_config(root: Path, kwargs: dict[str, Any]) -> JanusConfig:
    """config.json, or `config`, with `language_config` and `attn_implementation` applied."""
    data = _as_dict("config", kwargs["config"]) if kwargs.get("config") is not None \
        else copy.deepcopy(JanusConfig.from_file(root / "config.json").raw)
    if kwargs.get("language_config") is not None:
        data["language_config"] = _as_dict("language_config", kwargs["language_config"])
    if kwargs.get("attn_implementation") is not None:
        data["language_config"] = {**data.get("language_config", {}),
                                   "_attn_implementation": kwargs["attn_implementation"]}
    try:
        return JanusConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"the config given to from_pretrained: {exc}") from None


class AutoConfig:
    """`AutoConfig.from_pretrained(path)`: an `EditableConfig` of the checkpoint's config.json."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, revision: str | None = None,
                        trust_remote_code: bool | None = None, **kwargs: Any) -> EditableConfig:
        from .loading.hub import resolve_checkpoint

        if kwargs:
            raise _unsupported("AutoConfig.from_pretrained", list(kwargs), ["revision", "trust_remote_code"])
        root = resolve_checkpoint(pretrained_model_name_or_path, revision)
        return editable(JanusConfig.from_file(root / "config.json"))


class AutoModelForCausalLM:
    """`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, ...)`: janusvl's
    `MultiModalityCausalLM`, loaded as transformers 4.x loads DeepSeek's (see `deepseek_from_pretrained`)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any,
                        **kwargs: Any) -> MultiModalityCausalLM:
        if model_args:
            raise InputError("AutoModelForCausalLM.from_pretrained takes the checkpoint path as its only "
                             f"positional argument; got {len(model_args)} more")
        return deepseek_from_pretrained("AutoModelForCausalLM.from_pretrained", pretrained_model_name_or_path, **kwargs)
