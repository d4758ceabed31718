"""Rewrite a Janus checkpoint: DeepSeek's layout as sharded safetensors, or transformers' layout.

`to="deepseek"` is a lossless copy: the same keys (the unused `attn_pool.*` and `codebook_used`
included) and dtypes, written as `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`
(one `model.safetensors` when everything fits in one shard), with the small json / tokenizer files
copied byte for byte. `quantize="int8"` or `"int4"` stores the decoder's projections quantised
instead, as janusvl.loading.quantized describes. `to="hf"` writes what
`transformers.JanusForConditionalGeneration` and `JanusProcessor` load (spec section 6).

The source is checked by the loader's own strict checks before anything is written; tensors are
then streamed one at a time into shards, so memory holds about one shard, never the whole model.
All output goes to a hidden directory beside DST that is renamed to DST only once complete, so a
failure (or Ctrl-C) never leaves a half-written DST.
"""

from __future__ import annotations

import fnmatch
import json
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import JanusConfig
from ..errors import InputError, JanusError
from ..models.quant import SCHEMES
from .checkpoint import (DTYPES, _open, check_keys, check_shape, expected_state, keys_by_file,
                         resolve_dtype, stored_dtype, weight_files)
from .hf_layout import to_transformers_state_dict, transformers_config_dict
from ..processing.tokenizer import read_json_object
from .hub import resolve_checkpoint
from .quantized import check_convertible, quantization_config_dict, quantize_stream

TARGETS = ("deepseek", "hf")
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # "2GB", in the decimal units transformers uses too
WEIGHT_INDEXES = frozenset({"model.safetensors.index.json", "pytorch_model.bin.index.json"})
SMALL_FILES = ("*.json", "*.model", "*.txt")  # travel with the weights unchanged
HF_REWRITTEN = frozenset({"config.json", "preprocessor_config.json", "processor_config.json",
                          "tokenizer_config.json"})
_EMBED = "language_model.model.embed_tokens.weight"
CONVERTED_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


class ConvertError(JanusError):
    """The destination cannot be written: it is the source, holds files, or is not writable."""


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str = "deepseek",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    force: bool = False,
    revision: str | None = None,
    quantize: str | None = None,
) -> Path:
    """Convert the checkpoint at `src` (directory or Hub id, any of the four weight layouts) into
    a new directory `dst` and return it.

    `to`: "deepseek" (lossless sharded safetensors) or "hf" (transformers' Janus layout).
    `dtype`: None or "keep" keeps every tensor's dtype; a float dtype casts the floating tensors.
    `quantize`: None or "none" copies; "int8" or "int4" stores the decoder's projections and head
    quantised (to="deepseek" only; the source must not be quantised already), quantised in the
    dtype the copy loads in, so loading it gives what `quantize=` at load gives the source.
    `force`: replace a `dst` that holds a previous conversion (config.json, safetensors weights
    and nothing but the files a conversion writes), once the new one is complete. Any other
    non-empty `dst` is refused, with the reason, and left as it is.
    """
    if to not in TARGETS:
        raise InputError(f"unknown target {to!r}; use one of {', '.join(TARGETS)}")
    if max_shard_bytes < 1:
        raise InputError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if quantize not in (None, "none", *SCHEMES):
        raise InputError(f"quantize must be none, int8 or int4, got {quantize!r}")
    scheme = None if quantize == "none" else quantize
    cast = _cast_dtype(dtype)
    root = resolve_checkpoint(src, revision)
    dst = Path(dst).expanduser()
    _check_destination(root, dst, force)
    config = JanusConfig.from_file(root / "config.json")
    check_convertible(root, config, scheme, to, cast)
    where = weight_files(root)
    expected = expected_state(config)
    check_keys(root, where, expected)
    if to == "hf":
        extra = _hf_files(root, config, cast or stored_dtype(root))
    else:
        extra = _deepseek_files(root, cast, config, scheme)

    tmp = _make_temp_dir(dst)
    try:
        with _progress_bar(where, progress) as bar:
            shards = _ShardWriter(tmp, max_shard_bytes)
            tensors = _read_tensors(where, expected, cast, bar)
            if scheme is not None:
                load_dtype = cast or resolve_dtype("auto", config, stored_dtype(root))
                tensors = quantize_stream(tensors, config, scheme, expected, load_dtype)
            for key, tensor in tensors:
                if to == "deepseek":
                    shards.add(key, tensor)
                    continue
                for name, part in _to_hf(key, tensor, config).items():
                    shards.add(name, part)
            shards.finish()
        _write_small_files(root, tmp, extra, skip=HF_REWRITTEN if to == "hf" else frozenset())
        _install(tmp, dst)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, JanusError):
            raise ConvertError(f"converting {root} into {dst} failed, nothing was written: {exc}") from None
        raise
    return dst


def _cast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "keep":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InputError(f"dtype {dtype!r} is not supported; use keep, bfloat16, float16 or float32")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- destination --------------------------------------------------------------------------------

def _check_destination(root: Path, dst: Path, force: bool) -> None:
    source, target = root.resolve(), dst.resolve()
    if target == source:
        raise ConvertError(f"destination {dst} is the source checkpoint; write the copy somewhere else")
    if source.is_relative_to(target):
        raise ConvertError(f"destination {dst} contains the source checkpoint {root}; it cannot be replaced")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ConvertError(f"destination {dst} exists and is not a directory")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    if not force:
        raise ConvertError(f"destination {dst} is not empty; use --force (force=True) to replace a "
                           "previous conversion there")
    why = _not_a_conversion(dst)
    if why:
        raise ConvertError(f"destination {dst} does not hold a previous conversion ({why}); --force replaces "
                           "only that, so nothing was changed: choose a new or empty directory")


def _not_a_conversion(dst: Path) -> str | None:
    """Why `dst` is not what a conversion writes, or None when it is: --force may then delete
    it whole, and no file of anyone else's goes with it."""
    entries = sorted(dst.iterdir())
    names = {p.name for p in entries}
    for path in entries:
        written = CONVERTED_WEIGHTS.fullmatch(path.name) or any(fnmatch.fnmatch(path.name, p) for p in SMALL_FILES)
        if path.is_symlink() or not path.is_file() or not written:
            return f"it holds {path.name!r}, which a conversion does not write"
    if "config.json" not in names:
        return "it has no config.json"
    if not names & {"model.safetensors", "model.safetensors.index.json"}:
        return "it has no model.safetensors or model.safetensors.index.json"
    return None


def _make_temp_dir(dst: Path) -> Path:
    """A fresh hidden directory beside `dst`, on the same file system so the final rename is cheap."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.partial-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        raise ConvertError(f"cannot write to {dst.parent}: {exc.strerror or exc}") from None
    return tmp


def _install(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst`; an existing (empty, or forced) `dst` goes only afterwards."""
    if not dst.exists():
        tmp.rename(dst)
        return
    old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
    dst.rename(old)
    try:
        tmp.rename(dst)
    except OSError:
        old.rename(dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- weights ------------------------------------------------------------------------------------

def _progress_bar(where: dict[str, Path], enabled: bool) -> tqdm:
    """A bar over the bytes of the source weight files, on stderr; silent unless enabled."""
    total = sum(p.stat().st_size for p in set(where.values()))
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Converting",
                file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def _read_tensors(
    where: dict[str, Path], expected: dict[str, torch.Tensor], cast: torch.dtype | None, bar: tqdm
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored tensor, one at a time in stored order, shape-checked like the loader does."""
    for path, keys in keys_by_file(where).items():
        size, done = path.stat().st_size, 0
        with _open(path) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                if key in expected:  # the unused groups have no shape the model dictates
                    check_shape(path, key, tensor, expected[key])
                step = min(tensor.nbytes, size - done)
                bar.update(step)
                done += step
                if cast is not None and tensor.is_floating_point():
                    tensor = tensor.to(cast)
                yield key, tensor
        bar.update(size - done)  # headers and pickle framing


def _to_hf(key: str, tensor: torch.Tensor, config: JanusConfig) -> dict[str, torch.Tensor]:
    out = to_transformers_state_dict({key: tensor})
    if key == _EMBED and config.language_config.tie_word_embeddings:
        out["lm_head.weight"] = tensor  # transformers' Janus is always written untied
    return out


class _ShardWriter:
    """Collects tensors into safetensors files of at most `max_bytes` (a larger tensor gets a file
    of its own), holding only the shard being filled in memory."""

    def __init__(self, dst: Path, max_bytes: int) -> None:
        self.dst, self.max_bytes = dst, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.storages: set[int] = set()
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0
        # safetensors creates owner-only files; give shards the mode any new file here gets.
        self.file_mode = dst.stat().st_mode & 0o666

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_bytes:
            self._flush()
        # safetensors stores whole, unshared buffers: copy views (a qkv third, a slice of a pickled
        # storage) and tensors that share memory with one already in this shard.
        storage = tensor.untyped_storage()
        if (not tensor.is_contiguous() or storage.nbytes() != tensor.nbytes
                or storage.data_ptr() in self.storages):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
            storage = tensor.untyped_storage()
        self.storages.add(storage.data_ptr())
        self.pending[key] = tensor
        self.pending_bytes += tensor.nbytes
        self.total += tensor.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.dst / f"shard-{len(self.written) + 1:05d}.partial"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        path.chmod(self.file_mode)
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes, self.storages = {}, 0, set()

    def finish(self) -> None:
        """Write the last shard and give every shard its final name (plus the index if several)."""
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            self.written[0][0].rename(self.dst / "model.safetensors")
            return
        weight_map: dict[str, str] = {}
        for i, (path, keys) in enumerate(self.written, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.dst / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(self.dst / "model.safetensors.index.json", index)


# --- small files --------------------------------------------------------------------------------

def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _small_files(root: Path) -> list[Path]:
    files = {p for pattern in SMALL_FILES for p in root.glob(pattern) if p.is_file()}
    return sorted(p for p in files if p.name not in WEIGHT_INDEXES)


def _write_small_files(
    root: Path, dst: Path, generated: dict[str, dict[str, Any]], skip: frozenset[str]
) -> None:
    """Copy the source's small files byte for byte, except those generated or skipped."""
    for path in _small_files(root):
        if path.name not in generated and path.name not in skip:
            shutil.copyfile(path, dst / path.name)  # follows the Hub cache's symlinks
    for name, data in generated.items():
        _write_json(dst / name, data)


def _deepseek_files(root: Path, cast: torch.dtype | None, config: JanusConfig,
                    scheme: str | None) -> dict[str, dict[str, Any]]:
    """config.json is copied unchanged, unless a cast makes the torch_dtype it states wrong (the
    loader's dtype="auto" follows it) or the decoder is quantised (`quantization_config` says so)."""
    if cast is None and scheme is None:
        return {}
    data = read_json_object(root / "config.json")
    stale = []
    if cast is not None:
        language = data.get("language_config")
        stale = [s for s in (data, language) if isinstance(s, dict) and s.get("torch_dtype", None) not in
                 (None, _dtype_name(cast))]
        for section in stale:
            section["torch_dtype"] = _dtype_name(cast)
    if scheme is not None:
        data["quantization_config"] = quantization_config_dict(config, scheme)
    return {"config.json": data} if stale or scheme is not None else {}


def _hf_files(root: Path, config: JanusConfig, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """config.json, processor files and tokenizer_config.json in transformers' Janus layout."""
    from ..processing.processor import VLChatProcessor

    processor = VLChatProcessor.from_pretrained(root)  # validates the tokenizer and both configs
    tokenizer, images = processor.tokenizer, processor.image_processor
    model = transformers_config_dict(config, processor.image_id)
    model["text_config"].update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=processor.pad_id)
    model.update(model_type="janus", architectures=["JanusForConditionalGeneration"],
                 torch_dtype=_dtype_name(dtype))
    preprocessor = {
        "image_processor_type": "JanusImageProcessor",
        "processor_class": "JanusProcessor",
        "size": {"height": images.image_size, "width": images.image_size},
        "min_size": images.min_size,
        "image_mean": list(images.image_mean),
        "image_std": list(images.image_std),
        "rescale_factor": images.rescale_factor,
        "do_rescale": True,
        "do_normalize": images.do_normalize,
        "do_resize": True,
        "do_pad": True,  # to a square of the mean colour, as DeepSeek does
        "resample": 3,  # PIL bicubic
    }
    # DeepSeek's prompts start with the system prompt; transformers adds it when asked to.
    processor_config = {"processor_class": "JanusProcessor", "num_image_tokens": processor.num_image_tokens,
                        "use_default_system_prompt": True}
    tokenizer_config = read_json_object(root / "tokenizer_config.json")
    tokenizer_config.update(
        # tokenizer.json is used as is (byte-level BPE, BOS added by its post-processor).
        tokenizer_class="PreTrainedTokenizerFast",
        processor_class="JanusProcessor",
        extra_special_tokens={"image_token": processor.image_tag, "boi_token": processor.image_start_tag,
                              "eoi_token": processor.image_end_tag},
    )
    return {"config.json": model, "preprocessor_config.json": preprocessor,
            "processor_config.json": processor_config, "tokenizer_config.json": tokenizer_config}


__all__ = ["convert_checkpoint", "ConvertError", "TARGETS", "DEFAULT_MAX_SHARD_BYTES"]
