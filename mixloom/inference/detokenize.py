"""Generated tokens to text, a token at a time: no multi-byte character split across two
pieces, and nothing released that may turn out to be the start of a stop string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens decoded before the generated ones, so that the first generated token's text
# comes out as it does in context (a SentencePiece word start drops its space when alone).
PROMPT_CONTEXT = 5
_INCOMPLETE = "\ufffd"  # what decode gives for the leading bytes of an unfinished character


class TextStream:
    """The text of one sample's generated tokens, released as it becomes final."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int], stop: Sequence[str]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt[-PROMPT_CONTEXT:])
        # the window decoded each time: ids[prefix:]; ids[prefix:read] is text already taken
        self._prefix, self._read = 0, len(self._ids)
        self._stop = tuple(stop)
        self._text = ""  # decoded so far (released + held back)
        self._released = 0  # length of the released part of _text

    @property
    def text(self) -> str:
        """Everything released."""
        return self._text[: self._released]

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token: (newly released text, whether a stop string ended the text)."""
        self._ids.append(token)
        before = self._decode(self._prefix, self._read)
        now = self._decode(self._prefix, len(self._ids))
        if len(now) > len(before) and not now.endswith(_INCOMPLETE):
            self._text += now[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """At the end: release the rest, that is text held back for a stop string that never
        came and a trailing unfinished character (as U+FFFD, as a whole decode gives it), up
        to a stop string if one is there after all."""
        if self._read < len(self._ids):
            before = self._decode(self._prefix, self._read)
            self._text += self._decode(self._prefix, len(self._ids))[len(before) :]
            self._prefix = self._read = len(self._ids)
        piece, _ = self._release(final=True)
        return piece

    def _decode(self, start: int, end: int) -> str:
        return str(self._tok.decode(self._ids[start:end], skip_special_tokens=True))

    def _release(self, final: bool = False) -> tuple[str, bool]:
        text, start = self._text, self._released
        found = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if found:  # a stop string cannot start in released text: it would have been held
            end = min(found)
            self._text = text[:end]
            self._released = end
            return text[start:end], True
        end = len(text) - (0 if final else self._held(text))
        self._released = max(start, end)
        return text[start : self._released], False

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
