"""Strict loading of DeepSeek-layout Janus weights into a model built on the meta device.

Four layouts (spec §1): `model.safetensors`; sharded safetensors + `model.safetensors.index.json`;
`pytorch_model.bin`; sharded `.bin` + `pytorch_model.bin.index.json`. Tensors are read one at a
time (safetensors lazily, pickles through `torch.load(weights_only=True, mmap=True)`), cast to the
target dtype and device, and assigned, so peak memory stays near the final model size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..config import JanusConfig
from ..errors import CheckpointError, CheckpointNotFoundError, InputError
from .hub import resolve_checkpoint

# Key groups the checkpoint carries but the pipeline never uses; dropped by name, never loosely.
UNUSED_PREFIXES = ("vision_model.vision_tower.attn_pool.",)
UNUSED_KEYS = frozenset({"gen_vision_model.quantize.codebook_used"})

# Looked for in this order; an index wins over a single file beside it.
LAYOUTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
           "pytorch_model.bin")

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
          "fp32": torch.float32, "float": torch.float32}


def is_unused(key: str) -> bool:
    return key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for, but this torch build sees no CUDA device")
    if target.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r} was asked for, but MPS is not available here")
    return target


def resolve_dtype(dtype: str | torch.dtype | None, config: JanusConfig, stored: torch.dtype) -> torch.dtype:
    """"auto" (or None) keeps the checkpoint's own dtype (config `torch_dtype`, else the weights')."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype {dtype} is not supported; use bfloat16, float16 or float32")
        return dtype
    if dtype is None or dtype == "auto":
        return DTYPES.get(str(config.torch_dtype), stored if stored.is_floating_point else torch.float32)
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; use auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


def weight_files(root: Path) -> dict[str, Path]:
    """Map every stored key to the file holding it, from whichever layout `root` uses."""
    for name in LAYOUTS:
        path = root / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return {key: path for key in _keys_of(path)}
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a valid weight index ({exc})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: weight_map must map keys to shard files")
        names = {_shard_name(path, shard) for shard in weight_map.values()}
        shards = {shard: shard_path(root, path, shard) for shard in names}
        for shard in sorted(shards):
            if not shards[shard].is_file():
                raise CheckpointError(f"{path} names shard {shard!r}, which is not in {root}")
        return {key: shards[shard] for key, shard in weight_map.items()}
    raise CheckpointError(
        f"{root}: no weights found; expected one of model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _shard_name(index: Path, shard: object) -> str:
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: shard names must be non-empty strings, got {shard!r:.60}")
    return shard


def _allowed_roots(root: Path) -> list[Path]:
    """Where a checkpoint's files may live: its directory, and for a Hub cache snapshot (whose
    files are symlinks into the repository's blob store) that store."""
    roots = [root.resolve()]
    if root.parent.name == "snapshots":
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def shard_path(root: Path, index: Path, shard: str) -> Path:
    """The file a weight index names, refused when the name or the file it resolves to (through
    symlinks) leaves the checkpoint directory: an index must not make the loader read elsewhere."""
    escapes = (PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute()
               or bool(PureWindowsPath(shard).drive) or ".." in PurePosixPath(shard.replace("\\", "/")).parts)
    path = root / shard
    if not escapes:
        target = path.resolve()
        escapes = not any(target.is_relative_to(allowed) for allowed in _allowed_roots(root))
    if escapes:
        raise CheckpointError(f"{index} names shard {shard!r}, which is outside the checkpoint directory "
                              f"{root}; refused")
    return path


def check_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse a floating tensor holding NaN or infinity, naming it. One sum reads each value once
    without allocating, and NaN and infinity always survive a sum (NaN stays NaN, infinity stays
    infinite or turns NaN); only a non-finite sum (possibly an overflow of finite values) needs
    the exact, slower test."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{path}: {key!r} holds NaN or infinite values; pass allow_nonfinite=True "
                              "to load it anyway")


def _keys_of(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


class _PickleFile:
    """The part of safetensors' `safe_open` interface the loader uses, over a torch pickle."""

    def __init__(self, path: Path) -> None:
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            self._sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(self._sd, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(self._sd).__name__}")

    def keys(self) -> list[str]:
        return list(self._sd)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._sd[key]


@contextmanager
def _open(path: Path) -> Iterator[object]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                yield f
        else:
            yield _PickleFile(path)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors and torch.load raise many unrelated types on bad files
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None


def expected_state(config: JanusConfig, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The keys (as meta tensors, for shapes and dtypes) a checkpoint for `config` must hold,
    without the unused groups, and without lm_head when it is tied to the embeddings. `model`, if
    given, is that model already built on the meta device."""
    if model is None:
        from ..models.janus import MultiModalityCausalLM

        with torch.device("meta"):
            model = MultiModalityCausalLM(config)
    expected = {k: v for k, v in model.state_dict().items() if not is_unused(k)}
    if config.language_config.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight", None)
    if config.quantization_config is not None:
        from .quantized import expected_tensors

        expected = expected_tensors(config, expected)
    return expected


def check_keys(root: Path, where: dict[str, Path], expected: dict[str, torch.Tensor]) -> None:
    """Strict key check of `where` (from `weight_files`): unused groups may be present or not;
    any other unexpected or missing key is an error naming it and its file."""
    stored = {k for k in where if not is_unused(k)}
    unexpected = sorted(stored - set(expected))
    if unexpected:
        key = unexpected[0]
        raise CheckpointError(
            f"{where[key]}: unexpected key {key!r} (and {len(unexpected) - 1} more) that the model "
            "described by config.json does not have"
        )
    missing = sorted(set(expected) - stored)
    if missing:
        sources = sorted({f.name for f in where.values()})
        raise CheckpointError(
            f"{root}: missing key {missing[0]!r} (and {len(missing) - 1} more) in {', '.join(sources)}"
        )


def check_shape(path: Path, key: str, tensor: torch.Tensor, want: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(want.shape):
        raise CheckpointError(
            f"{path}: {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(want.shape)}"
        )


def keys_by_file(where: dict[str, Path]) -> dict[Path, list[str]]:
    """Group `where` by file, keeping the stored key order, so each file is opened once."""
    by_file: dict[Path, list[str]] = {}
    for key, path in where.items():
        by_file.setdefault(path, []).append(key)
    return by_file


def read_state_dict(
    root: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
    allow_nonfinite: bool = False, exact: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Read every expected key, strictly: missing, unexpected or mis-shaped keys are errors, and
    so are NaN or infinite weights unless `allow_nonfinite`. Floating tensors are cast to `dtype`,
    except the keys in `exact`, which must be stored in the expected dtype and keep it."""
    where = weight_files(root)
    check_keys(root, where, expected)
    stored = {k: f for k, f in where.items() if not is_unused(k)}
    state: dict[str, torch.Tensor] = {}
    for path, keys in keys_by_file(stored).items():
        with _open(path) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                want = expected[key]
                check_shape(path, key, tensor, want)
                if key in exact and tensor.dtype != want.dtype:
                    raise CheckpointError(f"{path}: {key!r} is stored as {tensor.dtype}, the quantised layer "
                                          f"needs {want.dtype}")
                if not allow_nonfinite:
                    check_finite(path, key, tensor)
                cast = dtype if want.is_floating_point() and key not in exact else want.dtype
                state[key] = tensor.to(device=device, dtype=cast)
    return state


def stored_dtype(root: Path) -> torch.dtype:
    """The dtype of one floating-point weight, read without loading the checkpoint."""
    where = weight_files(root)
    key = next((k for k in where if k.endswith("embed_tokens.weight")), next(iter(where)))
    with _open(where[key]) as f:
        return f.get_tensor(key).dtype


def load_model(
    model_path: str | Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    config: JanusConfig | None = None,
    allow_nonfinite: bool = False,
) -> "MultiModalityCausalLM":  # noqa: F821
    """The model in `model_path`, built from its config.json or from `config` (an edited copy).
    Weights holding NaN or infinity are refused (naming the tensor) unless `allow_nonfinite`.
    A pre-quantised checkpoint (janusvl.loading.quantized) loads with its decoder quantised."""
    from ..models.janus import MultiModalityCausalLM
    from .quantized import check_loadable, exact_dtype_keys, install

    root = resolve_checkpoint(model_path, revision)
    if config is None:
        config = JanusConfig.from_file(root / "config.json")
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, config, stored_dtype(root) if dtype in (None, "auto") else torch.float32)
    quantized = check_loadable(config, target_device)
    with torch.device("meta"):
        model = MultiModalityCausalLM(config)
    expected = expected_state(config, model)
    state = read_state_dict(root, expected, target_dtype, target_device, allow_nonfinite, exact_dtype_keys(config))
    if quantized is not None:  # the decoder's layers are built on their stored operands
        install(model.language_model, state, config)
    tied = config.language_config.tie_word_embeddings and quantized is None
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    model.checkpoint_path = root
    return model.eval().requires_grad_(False)


__all__ = ["load_model", "read_state_dict", "weight_files", "expected_state", "check_keys",
           "resolve_device", "resolve_dtype", "CheckpointError", "CheckpointNotFoundError", "is_unused"]
