"""Token ids -> text, one token at a time, for streaming.

Two rules make the streamed text equal the text a single `decode` of all ids gives:
- a multi-byte character may arrive over several byte tokens: while the decoded tail is U+FFFD
  (an incomplete UTF-8 sequence), it is held back, and released once the character is complete;
- a stop string may arrive over several tokens: a tail that could be the start of one is held
  back, and the text is cut where a stop string begins.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..processing.tokenizer import JanusTokenizer

REPLACEMENT = "\ufffd"
# Re-decode from a few tokens back rather than from the very start, so each step costs O(1)
# while tokenizers whose decode depends on the left neighbour still see some context.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Feeds ids in, gives back the text that is final. Special tokens are skipped, as
    `decode(..., skip_special_tokens=True)` does. Concatenating every `push` and the
    `flush` equals `tokenizer.decode(ids, skip_special_tokens=True)`."""

    def __init__(self, tokenizer: JanusTokenizer) -> None:
        self.tokenizer = tokenizer
        self._special = set(tokenizer.all_special_ids)
        self._ids: list[int] = []
        self._start = 0  # window start: text is always decoded from here
        self._done = 0  # characters of the window's text already given out
        # clean_up_tokenization_spaces rewrites " ." and friends, which never span a newline,
        # so with it on, only whole lines are final.
        self._by_line = tokenizer.clean_up_tokenization_spaces

    def push(self, token_id: int) -> str:
        if token_id in self._special:
            return ""
        self._ids.append(int(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        """Everything still held back (call once, after the last token)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.tokenizer.decode(self._ids[self._start:], skip_special_tokens=True)
        end = len(text) if final else self._stable_end(text)
        new = text[self._done:end]
        self._done = max(self._done, end)
        if end == len(text) and len(self._ids) - self._start > 2 * _CONTEXT_TOKENS:
            # The whole window is out: restart it a few tokens back.
            self._start = len(self._ids) - _CONTEXT_TOKENS
            self._done = len(self.tokenizer.decode(self._ids[self._start:], skip_special_tokens=True))
        return new

    def _stable_end(self, text: str) -> int:
        end = len(text.rstrip(REPLACEMENT))
        if self._by_line:
            end = min(end, text.rfind("\n", 0, end) + 1)
        return end


class StopMatcher:
    """Cuts a text stream at the first stop string, holding back any tail that could begin one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return buf[:cut]
        keep = self._partial_stop_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best


class TextStream:
    """One generated sequence: ids in, final text out, stop strings applied.

    `push(id)` returns the text that may be shown now; `finish()` the rest once generation has
    ended. `stopped` turns true when a stop string appeared (the text ends before it); `text` is
    everything given out so far."""

    def __init__(self, tokenizer: JanusTokenizer, stop: Sequence[str] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stop)
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._emit(self._stops.push(self._detok.push(token_id)))

    def finish(self) -> str:
        if self.stopped:
            return ""
        out = self._stops.push(self._detok.flush())
        return self._emit(out + self._stops.flush())

    def _emit(self, chunk: str) -> str:
        self.text += chunk
        return chunk
