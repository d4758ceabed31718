"""Chat messages as users write them -> the DeepSeek conversation the processor renders.

Two forms are accepted, even mixed in one list:
- OpenAI style: `role` user / assistant / system; `content` a string or a list of parts
  `{"type": "text", "text": ...}`, `{"type": "image", "image": path | PIL | bytes | data URL}`,
  `{"type": "image_url", "image_url": {"url": ...}}`. Roles are mapped to the model's names.
- DeepSeek style: `{"role": "<|User|>", "content": "...<image_placeholder>...", "images": [...]}`;
  roles are kept verbatim, as DeepSeek's own pipeline does.
Image parts become image tags where they stand, each followed by a newline, which is how
DeepSeek writes prompts ("<image_placeholder>\\nDescribe this image.").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .processing.processor import image_list
from .validation import check_encodable, roles as check_roles
from .processing.images_io import ImageSource
from .processing.tokenizer import JanusTokenizer

PRO_ROLES = ("<|User|>", "<|Assistant|>")
V1_ROLES = ("User", "Assistant")  # Janus-1.3B

Messages = Sequence[Mapping[str, Any]]


def detect_roles(tokenizer: JanusTokenizer) -> tuple[str, str]:
    """Janus-Pro's tokenizer has `<|User|>` as an added token; Janus-1.3B's writes plain names."""
    return PRO_ROLES if tokenizer.token_to_id(PRO_ROLES[0]) is not None else V1_ROLES


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # DeepSeek form, ending with the open assistant turn
    system_prompt: str | None  # None: keep the processor's default
    images: list[ImageSource] = field(default_factory=list)


def _image_source(part: Mapping[str, Any], where: str) -> ImageSource:
    if part.get("type") == "image":
        source = part.get("image")
    else:
        url = part.get("image_url")
        source = url.get("url") if isinstance(url, Mapping) else url
    if source is None:
        raise InputError(f"{where}: image part has no image (expected 'image' or 'image_url.url')")
    if isinstance(source, str) and source[:7].lower() == "file://":
        source = source[len("file://"):]
    return source


def _content(message: Mapping[str, Any], where: str, image_tag: str) -> tuple[str, list[ImageSource]]:
    content = message.get("content")
    images = image_list(message.get("images"), f"{where}.images")
    if content is None or isinstance(content, str):
        check_encodable(f"{where}.content", content or "")
        return content or "", images
    if not isinstance(content, Sequence):
        raise InputError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
    if images:
        raise InputError(f"{where}: give images either as content parts or in 'images', not both")
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            check_encodable(f"{where}.content[{j}].text", part["text"])
            pieces.append(part["text"])
        elif kind in ("image", "image_url"):
            images.append(_image_source(part, f"{where}.content[{j}]"))
            pieces.append(image_tag)
        else:
            raise InputError(f"{where}.content[{j}]: expected a part of type 'text' (with a 'text' "
                             f"string), 'image' or 'image_url', got {part!r:.80}")
    return "\n".join(pieces), images


def _kind(role: Any, roles: tuple[str, str], where: str) -> tuple[str, str]:
    """("user" | "assistant", the role name to render) for one message."""
    if role == "user":
        return "user", roles[0]
    if role == "assistant":
        return "assistant", roles[1]
    if role in (roles[0], *PRO_ROLES[:1], *V1_ROLES[:1]):
        return "user", role
    if role in (roles[1], *PRO_ROLES[1:], *V1_ROLES[1:]):
        return "assistant", role
    raise InputError(f"{where}: unknown role {role!r}; use user, assistant or system "
                     f"(or DeepSeek's {roles[0]!r} / {roles[1]!r})")


def build_conversation(messages: Messages | str, roles: tuple[str, str],
                       image_tag: str = "<image_placeholder>") -> Conversation:
    """Check `messages` and turn them into a DeepSeek conversation ready for the template.

    System messages (only before the first turn) replace the default system prompt. Turns must
    alternate user / assistant starting with the user, and end with a user turn (the assistant's
    open turn is added) or with DeepSeek's empty assistant turn. A bare string is one user turn."""
    roles = check_roles(roles)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty list of {'role', 'content'} dicts")
    system: list[str] | None = None
    turns: list[dict[str, str]] = []
    kinds: list[str] = []
    images: list[ImageSource] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InputError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        text, found = _content(message, where, image_tag)
        if message.get("role") == "system":
            if turns:
                raise InputError(f"{where}: a system message must come before the conversation")
            if found:
                raise InputError(f"{where}: a system message cannot hold images")
            system = [*(system or []), text]
            continue
        kind, name = _kind(message.get("role"), roles, where)
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if kind != expected:
            raise InputError(f"{where}: expected a {expected} turn (turns alternate user, assistant, "
                             f"... starting with the user), got {kind}")
        turns.append({"role": name, "content": text})
        kinds.append(kind)
        images.extend(found)
    if not turns:
        raise InputError("messages hold no user turn")
    if kinds[-1] == "assistant" and turns[-1]["content"].strip():
        raise InputError("the conversation ends with an assistant turn; end it with a user turn")
    if kinds[-1] == "user":
        turns.append({"role": roles[1], "content": ""})
    return Conversation(turns, None if system is None else "\n".join(system), images)
