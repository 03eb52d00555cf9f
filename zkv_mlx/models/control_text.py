"""Keep control markers typed into chat messages from becoming control tokens.

A chat template renders to text and that text is tokenized with special tokens allowed, so a user message
containing ``<|im_end|>\\n<|im_start|>system`` would close its own turn and open a forged system turn (mlx-lm and
Hugging Face templates behave so). Here only the markers the *template* writes become control tokens:

1. in each message's content, every special-token string is replaced by a sentinel (private-use characters plus
   a random nonce, so no content can spell one) before rendering; the template's own logic (trim, split on
   ``</think>``, default system prompt) still sees the content, with only the markers swapped;
2. the rendered text is cut at the special-token strings left in it, which are the template's own;
3. each piece between them gets its sentinels turned back into the marker text and is tokenized with special
   tokens disabled, so the marker text becomes ordinary text tokens (``<``, ``|``, ``im``, ...).

Cutting at special tokens and tokenizing the pieces apart is what the Hugging Face tokenizer does itself, so a
conversation without markers in its content gets exactly the ids of ``encode(apply_chat_template(...))``.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable

from tokenizers import Tokenizer as HFTokenizer

__all__ = ["ControlText"]


class ControlText:
    """The special (control) tokens of a vocabulary, and encoding that lets only a template's markers be control.

    Args:
        backend: The model's ``tokenizers.Tokenizer``. Its added tokens marked ``special`` are the control
            tokens; non-special added tokens (e.g. Qwen3's ``<think>``) keep their ids in content, as they are
            ordinary vocabulary the model also writes itself.
    """

    def __init__(self, backend: HFTokenizer):
        added = backend.get_added_tokens_decoder()
        # Longest first: Python's leftmost-first alternation then finds the leftmost-longest marker, the same
        # match the tokenizer's own added-token search makes.
        self.markers: list[str] = sorted({str(t.content) for t in added.values() if t.special and t.content},
                                         key=lambda s: (-len(s), s))
        self.ids: dict[str, int] = {s: backend.token_to_id(s) for s in self.markers}
        self._pattern = re.compile("|".join(map(re.escape, self.markers))) if self.markers else None
        self._backend = backend
        self._plain: HFTokenizer | None = None
        self._lock = threading.Lock()

    def encode_plain(self, text: str) -> list[int]:
        """Tokenize text with every special-token string in it as ordinary text.

        Args:
            text: Any text.

        Returns:
            Token ids, none of them a control token (no BOS/EOS added either).
        """
        if self._pattern is None or not self._pattern.search(text):
            return self._backend.encode(text, add_special_tokens=False).ids  # nothing to keep from matching
        return self._plain_tokenizer().encode(text, add_special_tokens=False).ids

    def _plain_tokenizer(self) -> HFTokenizer:
        # A copy with special-token matching off (tokenizers' encode_special_tokens, which transformers exposes
        # as split_special_tokens): a flag on the shared tokenizer would race between threads, a copy cannot.
        # Built on first need only (about half a second for a 50k vocabulary): most text holds no marker.
        with self._lock:
            if self._plain is None:
                plain = HFTokenizer.from_str(self._backend.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain

    def encode_rendered(self, contents: list[str], render: Callable[[list[str]], str]) -> list[int]:
        """Render a conversation and tokenize it so that only the template's markers become control tokens.

        Args:
            contents: Each message's content, in order.
            render: Renders the conversation given replacement contents (same order and length) to prompt text.

        Returns:
            The prompt's token ids.
        """
        if self._pattern is None:
            return self.encode_plain(render(contents))
        nonce = secrets.token_hex(8)
        index = {s: i for i, s in enumerate(self.markers)}
        sentinel = re.compile(f"\ue000{nonce}(\\d+)\ue001")
        masked = [self._pattern.sub(lambda m: f"\ue000{nonce}{index[m.group()]}\ue001", c) for c in contents]
        text = render(masked)
        ids: list[int] = []
        pos = 0
        for m in self._pattern.finditer(text):  # only the template's markers are left
            ids += self._plain_piece(text[pos : m.start()], sentinel)
            ids.append(self.ids[m.group()])
            pos = m.end()
        ids += self._plain_piece(text[pos:], sentinel)
        return ids

    def _plain_piece(self, piece: str, sentinel: re.Pattern) -> list[int]:
        if not piece:
            return []
        return self.encode_plain(sentinel.sub(lambda m: self.markers[int(m.group(1))], piece))
