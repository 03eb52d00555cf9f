"""Streaming detokenizer: decodes generated tokens a short window at a time, holding back split UTF-8."""

from __future__ import annotations

from typing import Callable

__all__ = ["StreamDetokenizer"]

# Longest run of tokens the stream detokenizer holds back waiting for a UTF-8 sequence to
# complete. A character is at most 4 bytes and every token is at least 1 byte, so a real
# incomplete character never needs more; past this the U+FFFD is genuine and is emitted.
_MAX_PENDING_TOKENS = 8


class StreamDetokenizer:
    """Incremental detokenizer for generated tokens.

    Each ``add`` decodes only a short window of trailing ids (the tokens since the
    last emitted chunk plus the ones before it, for context), so the cost per call
    does not grow with the length of the output. Text whose decoding ends with
    U+FFFD is held back: the last token(s) ended inside a multi-byte UTF-8
    character, which completes with a later token.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        """Create a detokenizer.

        Args:
            decode: Function decoding a list of token ids to text (for example
                ``lambda ids: tokenizer.decode(ids)``). It must be context-free
                enough that decoding a window of trailing ids gives the tail of the
                full decoding, which holds for byte-level BPE.
        """
        self._decode = decode
        self._window: list[int] = []  # ids from the prefix offset on; older ids are dropped
        self._read = 0  # index in _window of the first id whose text has not been emitted
        self._prefix_text: str | None = None  # cached decode(_window[:_read])
        self._chunks: list[str] = []
        self._text_cache = ""
        self._num_tokens = 0

    def add(self, token_id: int) -> str:
        """Add one generated token.

        Args:
            token_id: The token id.

        Returns:
            The newly completed text (possibly ``""`` while a UTF-8 sequence is incomplete).
        """
        self._window.append(int(token_id))
        self._num_tokens += 1
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[: self._read])
        prefix_text = self._prefix_text
        new_text = self._decode(self._window)
        pending = len(self._window) - self._read
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            chunk = new_text[len(prefix_text) :]
            # The just-emitted tokens become the context window for the next call.
            self._window = self._window[self._read :]
            self._read = len(self._window)
            self._prefix_text = None
            return self._emit(chunk)
        if pending > _MAX_PENDING_TOKENS:
            # Not an incomplete character but genuinely invalid bytes: emit them as U+FFFD
            # and restart without context so the window stays bounded.
            chunk = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else new_text
            self._window = []
            self._read = 0
            self._prefix_text = ""
            return self._emit(chunk)
        return ""

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete sequence decodes as U+FFFD).

        Returns:
            The remaining text; ``""`` if nothing was pending.
        """
        if self._read == len(self._window):
            return ""
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        chunk = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else new_text
        self._window = []
        self._read = 0
        self._prefix_text = ""
        return self._emit(chunk)

    def reset(self) -> None:
        """Forget all tokens and text, to reuse the detokenizer for a new output."""
        self._window = []
        self._read = 0
        self._prefix_text = None
        self._chunks = []
        self._text_cache = ""
        self._num_tokens = 0

    @property
    def text(self) -> str:
        """All text emitted so far (by ``add`` and ``flush``)."""
        if self._chunks:
            # Joined lazily and cached, so reading .text every step stays cheap.
            self._text_cache += "".join(self._chunks)
            self._chunks = []
        return self._text_cache

    @property
    def num_tokens(self) -> int:
        """Number of tokens added so far."""
        return self._num_tokens

    def _emit(self, chunk: str) -> str:
        if chunk:
            self._chunks.append(chunk)
        return chunk
