"""The one set of argument checks every public entry point runs (library, CLI, engine, server).

Each check takes the argument's name as the caller spells it ("max_new_tokens" in the library,
"--max-new-tokens" on the command line), returns the value in its canonical type, and raises
`InputError` whose message starts with that name. Types are strict: a bool is not an integer, a
float is not an integer even when it is whole (2.9 would otherwise be truncated to 2), a string
is never a number. Deeper code may then assume valid input.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

from .errors import ContextLengthError, InputError

# torch.Generator.manual_seed takes any 64-bit value; the OpenAI-style API takes a non-negative
# int64, and one range for every entry point keeps a seed valid wherever it is reused.
MAX_SEED = 2**63 - 1
# Below this a draw is greedy in all but name, and scaled logits overflow half precision; 0 asks
# for greedy decoding explicitly.
MIN_TEMPERATURE = 1e-5
# Images per generation call: each is two rows of the guided batch with a KV cache of ~600
# positions (Janus-Pro-1B: ~240 MB per image in bf16), so 64 already asks for ~15 GB.
MAX_IMAGES = 64
# Guidance far beyond DeepSeek's 5 gives noise rather than a sharper image.
MAX_CFG_WEIGHT = 100.0


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int within [minimum, maximum]; numpy integers count, bools and floats do not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {_describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be at most {maximum}, got {value}")
    return value


def _g(x: float) -> str:
    return f"{x:g}"


def _range(minimum: float | None, maximum: float | None, above: float | None) -> str:
    """The allowed range in interval notation, e.g. "in (0, 1]", ">= 0"."""
    low = f"({_g(above)}" if above is not None else f"[{_g(minimum)}" if minimum is not None else None
    if low and maximum is not None:
        return f"in {low}, {_g(maximum)}]"
    if low:
        return f"> {_g(above)}" if above is not None else f">= {_g(minimum)}"  # type: ignore[arg-type]
    return f"<= {_g(maximum)}" if maximum is not None else "finite"


def number(name: str, value: object, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> float:
    """`value` as a finite float within [minimum, maximum] (and > `above`, when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {_describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        raise InputError(f"{name} must be a finite number, got {_describe(value)}") from None
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if ((above is not None and value <= above) or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        raise InputError(f"{name} must be {_range(minimum, maximum, above)}, got {_g(value)}")
    return value


def temperature(name: str, value: object, greedy_allowed: bool = True) -> float:
    """0 (greedy, when allowed) or a finite temperature of at least MIN_TEMPERATURE."""
    value = number(name, value, minimum=0.0)
    if value == 0.0 and greedy_allowed:
        return value
    if value < MIN_TEMPERATURE:
        zero = "0 (greedy) or " if greedy_allowed else ""
        raise InputError(f"{name} must be {zero}at least {MIN_TEMPERATURE}, got {value}")
    return value


def seed(name: str, value: object) -> int | None:
    """None (unseeded) or an integer in 0..MAX_SEED."""
    if value is None:
        return None
    return integer(name, value, 0, MAX_SEED)


def text(name: str, value: object, allow_empty: bool = True) -> str:
    """A str that UTF-8 can encode (no lone surrogates, which the tokenizer cannot take)."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputError(f"{name} must be a non-empty string, got {_describe(value)}")
    check_encodable(name, value)
    return value


def check_encodable(name: str, value: str) -> None:
    """Refuse lone surrogates (e.g. from a badly decoded JSON "\\ud800"): UTF-8 has no bytes for them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{name} holds a lone surrogate {value[exc.start]!r} at character {exc.start}, "
                         "which is not valid Unicode text") from None


def stop_list(stop: object, name: str = "stop") -> list[str]:
    """None, one string or a list of non-empty strings -> a list of stop strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, Sequence) or isinstance(stops, (bytes, bytearray)):
        raise InputError(f"{name} must be a string or a list of non-empty strings, got {_describe(stop)}")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise InputError(f"{name} must be a string or a list of non-empty strings; "
                             f"{name}[{i}] is {_describe(s)}")
        check_encodable(f"{name}[{i}]", s)
    return list(stops)


def roles(value: object, name: str = "roles") -> tuple[str, str]:
    """Two non-empty role names (user, assistant)."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(r, str) and r for r in value)
    if not ok:
        raise InputError(f"{name} must be two non-empty strings (user, assistant), got {_describe(value)}")
    for r in value:
        check_encodable(name, r)
    return (value[0], value[1])


def check_length(prompt_tokens: int, max_new_tokens: object, context: int, images: int = 0,
                 tokens_per_image: int = 0, name: str = "max_new_tokens") -> int:
    """`max_new_tokens` checked, and the prompt plus the answer checked to fit the context.

    The advice names what to cut: the answer's length when the prompt alone leaves room,
    otherwise images (each costs `tokens_per_image`) or text. Raises `ContextLengthError`."""
    max_new_tokens = integer(name, max_new_tokens, minimum=1)
    excess = prompt_tokens + max_new_tokens - context
    if excess <= 0:
        return max_new_tokens
    head = (f"prompt of {prompt_tokens} tokens + {name} {max_new_tokens} exceeds the model's context of "
            f"{context} tokens (max_position_embeddings)")
    if prompt_tokens < context:
        raise ContextLengthError(f"{head}; lower {name} to at most {context - prompt_tokens}", prompt_tokens,
                                 max_new_tokens, context)
    with_images = f" with {images} image(s)" if images else ""
    advice = f"shorten the text by {excess} tokens"
    remove = math.ceil(excess / tokens_per_image) if tokens_per_image else images + 1
    if images and remove <= images:
        advice = f"remove {remove} image(s) or shorten the text by {excess} tokens"
    elif images:
        advice = f"remove images ({tokens_per_image} tokens each) and shorten the text, {excess} tokens in all"
    raise ContextLengthError(f"{head}: the prompt alone needs {prompt_tokens} tokens{with_images} and the "
                             f"context holds {context}; {advice}", prompt_tokens, max_new_tokens, context)


def available_memory(device: object) -> int | None:
    """Bytes free for new tensors on `device` (a torch.device); None when it cannot be told."""
    import torch

    try:
        if device.type == "cuda":  # type: ignore[attr-defined]
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":  # type: ignore[attr-defined]
            return _available_ram()
    except (RuntimeError, OSError, ValueError, AttributeError):
        pass
    return None


def _available_ram() -> int | None:
    try:  # Linux: what can be allocated without swapping, page cache counted as free
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(name: str, need: int, available: int | None, what: str) -> None:
    """Refuse work whose memory estimate (`need` bytes) exceeds what the device has free."""
    if available is not None and need > available:
        raise InputError(f"{name}: {what} needs about {need / 2**30:.1f} GiB, but only "
                         f"{available / 2**30:.1f} GiB is free on this device; lower {name}")
