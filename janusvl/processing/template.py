"""DeepSeek's chat prompt template ("sft format"), spec section 4.2."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError
from ..validation import check_encodable

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

EOS_TAG = "<｜end▁of▁sentence｜>"


def _deepseek(messages: list[tuple[str, str]], system_prompt: str) -> str:
    # Turns alternate user / assistant: a user turn ends with a blank line, an assistant turn with
    # EOS. An empty message is the open slot the model is asked to fill: "role:" and nothing after.
    prompt = f"{system_prompt}\n\n" if system_prompt else ""
    for i, (role, content) in enumerate(messages):
        if content:
            prompt += f"{role}: {content}" + ("\n\n" if i % 2 == 0 else EOS_TAG)
        else:
            prompt += f"{role}:"
    return prompt.strip()


SFT_FORMATS = {"deepseek": _deepseek}


def apply_sft_template(
    conversations: Sequence[Mapping[str, Any]],
    sft_format: str = "deepseek",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """Render DeepSeek-style messages (`{"role", "content", "images"?}`) into one prompt string.

    Roles are used verbatim ("User"/"Assistant" for Janus-1.3B, "<|User|>"/"<|Assistant|>" for
    Janus-Pro); each content is stripped. An unknown `sft_format` raises InputError.
    """
    template = SFT_FORMATS.get(sft_format) if isinstance(sft_format, str) else None
    if template is None:
        raise InputError(f"unknown sft_format {sft_format!r}; known: {sorted(SFT_FORMATS)}")
    if not isinstance(conversations, Sequence) or isinstance(conversations, str):
        raise InputError(f"conversations must be a list of messages, got {type(conversations).__name__}")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InputError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
    check_encodable("system_prompt", system_prompt or "")
    messages = []
    for i, message in enumerate(conversations):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InputError(f"conversations[{i}] must be a dict with a 'role' string")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise InputError(f"conversations[{i}]['content'] must be a string, got {type(content).__name__}")
        check_encodable(f"conversations[{i}]['role']", message["role"])
        check_encodable(f"conversations[{i}]['content']", content)
        messages.append((message["role"], content.strip()))
    return template(messages, system_prompt or "")
