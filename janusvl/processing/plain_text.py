"""Special-token strings in untrusted text, kept as ordinary text.

The tokenizer turns `<|Assistant|>`, the EOS string or `<image_placeholder>` into control tokens
wherever they appear, so a user who types them could end their own turn, forge an assistant turn
or claim an image slot. DeepSeek's pipeline does exactly that and the library keeps it (parity).
The server instead marks such strings in the text it receives (`escape`, before the chat
template adds its own control tokens), and `encode` spells the marked ones as ordinary text.

Marking rather than tracking character spans through the template keeps the template and the
message builder unchanged; a mark is a private-use character around the string's index, and a
private-use character the user sent is marked in turn, so marks cannot be forged either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .tokenizer import JanusTokenizer

MARK = "\ue000"
_MARKED = re.compile(f"{MARK}([0-9]+){MARK}")


class PlainText:
    def __init__(self, tokenizer: JanusTokenizer) -> None:
        self.tokenizer = tokenizer
        # Longest first: at one position the regex then takes the longest string, as the
        # tokenizer's own matcher does ("<|/ref|>" before a shorter string it starts with).
        specials = sorted(set(tokenizer.added_tokens), key=len, reverse=True)
        self.strings = [MARK, *specials]
        self._index = {s: i for i, s in enumerate(self.strings)}
        self._find = re.compile("|".join(map(re.escape, self.strings)))

    def escape(self, text: str) -> str:
        """`text` with every special-token string (and MARK itself) marked."""
        return self._find.sub(lambda m: f"{MARK}{self._index[m.group()]}{MARK}", text)

    def restore(self, prompt: str) -> str:
        """The text `prompt` stands for, marks undone (what the model is shown, for display)."""
        return _MARKED.sub(lambda m: self.strings[int(m.group(1))], prompt)

    def encode(self, prompt: str) -> list[int]:
        """Ids of a templated `prompt` (BOS first): marked strings as ordinary text, the rest as
        `JanusTokenizer.encode` reads it, so a prompt without marks gets exactly its ids."""
        if MARK not in prompt:
            return self.tokenizer.encode(prompt)
        ids: list[int] = []
        text = ""
        pieces = _MARKED.split(prompt)  # text, index, text, index, ..., text
        for i, piece in enumerate(pieces):
            string = piece if i % 2 == 0 else self.strings[int(piece)]
            if i % 2 == 0 or string == MARK:  # a user's own MARK character is ordinary text
                text += string
                continue
            # The tokenizer splits its input at every special string anyway, so encoding the
            # text on either side separately gives the ids a whole-prompt encode gives it.
            ids += self.tokenizer.encode(text, add_special_tokens=False)
            ids += self.tokenizer.encode_plain(string)
            text = ""
        ids += self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.with_bos_eos(ids)

    def escape_messages(self, messages: Sequence[Mapping[str, Any]] | str) -> Sequence[Any] | str:
        """`messages` with the text of every message (any role) escaped; images untouched.
        Malformed entries pass through unchanged, for the message builder to report."""
        if isinstance(messages, str):
            return self.escape(messages)
        return [self._escape_message(m) if isinstance(m, Mapping) else m for m in messages]

    def _escape_message(self, message: Mapping[str, Any]) -> Mapping[str, Any]:
        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": self.escape(content)}
        if isinstance(content, Sequence):
            parts = [{**p, "text": self.escape(p["text"])}
                     if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                     else p for p in content]
            return {**message, "content": parts}
        return message
