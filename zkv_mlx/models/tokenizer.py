"""Tokenizer: byte-level BPE built from GGUF metadata, chat templates, streaming decode.

The GGUF file carries the whole tokenizer (tokens, merges, token types, chat
template), so no Hugging Face files are needed. We rebuild it as a
``tokenizers.Tokenizer`` configured to split text exactly like llama.cpp does
for the same ``tokenizer.ggml.pre`` type, and can write it back out as a
``tokenizer.json`` for an mlx-lm model directory.

By concern: the GGUF vocabulary in ``gguf_vocab.py``, chat template rendering in ``chat_template.py``, the
streaming detokenizer in ``detokenizer.py``; their public names are importable from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as HFTokenizer

from ..storage.atomic import atomic_write
from .chat_template import CHATML_TEMPLATE, compile_template, render_template
from .control_text import ControlText
from .detokenizer import StreamDetokenizer
from .gguf_vocab import eog_ids, gguf_vocabulary
from .messages import normalize_messages

__all__ = ["Tokenizer", "StreamDetokenizer", "tokenizer_from_gguf_metadata", "CHATML_TEMPLATE"]


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token ids and chat template of a model."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        add_bos_token: bool = False,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
    ):
        """Wrap a ``tokenizers.Tokenizer``.

        Args:
            tokenizer: The underlying Hugging Face ``tokenizers.Tokenizer``.
            bos_token_id: Beginning-of-sequence id, or None.
            eos_token_ids: Ids that end generation.
            chat_template: Jinja chat template, or None to use ChatML.
            add_bos_token: Whether the tokenizer's post-processor prepends BOS
                (recorded for ``tokenizer_config.json``; the post-processor does the work).
            eos_token_id: The model's primary eos id (defaults to the smallest of
                ``eos_token_ids``).
            pad_token_id: Padding id, or None.
            unk_token_id: Unknown-token id, or None.
        """
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: set[int] = {int(i) for i in eos_token_ids}
        if eos_token_id is None and self.eos_token_ids:
            eos_token_id = min(self.eos_token_ids)
        if eos_token_id is not None:
            self.eos_token_ids.add(int(eos_token_id))
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.add_bos_token = add_bos_token
        self.chat_template: str | None = chat_template or None
        self._compiled_template = None
        self._control_text: ControlText | None = None

    # -- basic encode/decode -------------------------------------------------------

    @property
    def backend(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def bos_token(self) -> str | None:
        """Text of the BOS token, or None."""
        return self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        """Text of the primary EOS token, or None."""
        return self.id_to_token(self.eos_token_id)

    def id_to_token(self, token_id: int | None) -> str | None:
        """Return the vocabulary string of an id.

        Args:
            token_id: A token id (None gives None).

        Returns:
            The token's vocabulary string (byte-level encoded), or None if unknown.
        """
        return None if token_id is None else self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        """Return the id of a vocabulary string.

        Args:
            token: A vocabulary string, e.g. ``"<|im_end|>"``.

        Returns:
            Its id, or None if it is not in the vocabulary.
        """
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Tokenize text.

        Special-token strings in the text (e.g. ``<|im_start|>``) become their ids: this is the raw-prompt
        path (``generate``, ``/v1/completions``), where the caller writes the whole prompt. Text from someone
        else belongs in a chat message (``encode_chat``) or goes through ``control_text.encode_plain``.

        Args:
            text: Text to encode.
            add_special_tokens: Apply the post-processor (adds BOS when the model's
                ``add_bos_token`` is true). Off by default because chat templates
                already spell out their special tokens.

        Returns:
            The token ids.
        """
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Turn ids back into text.

        Args:
            ids: Token ids.
            skip_special_tokens: Leave special tokens out of the text.

        Returns:
            The text; bytes that do not form valid UTF-8 become U+FFFD.
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamDetokenizer:
        """Return a new streaming detokenizer for this tokenizer.

        Args:
            skip_special_tokens: Leave special tokens out of the streamed text.

        Returns:
            A ``StreamDetokenizer``.
        """
        tok = self._tok
        return StreamDetokenizer(lambda ids: tok.decode(ids, skip_special_tokens=skip_special_tokens))

    # -- chat --------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation with the model's chat template (ChatML if it has none).

        Low level: the messages are passed to the template as given, and the returned text, once
        tokenized with ``encode``, turns control markers inside message content into control tokens.
        ``encode_chat`` normalises the messages and keeps content plain text.

        Rendering matches transformers: a sandboxed Jinja environment with
        ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a
        ``raise_exception`` helper, ``strftime_now`` and a ``tojson`` filter.

        Args:
            messages: Dicts with at least ``role`` and ``content``.
            add_generation_prompt: Append the header that starts the assistant's turn.
            **kwargs: Extra template variables (e.g. ``tools``).

        Returns:
            The prompt text.

        Raises:
            ValueError: The template failed to render or called ``raise_exception``.
        """
        return render_template(
            self._get_template(),
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        *,
        allow_control_tokens: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """Normalise a conversation, render it with the chat template and tokenize it.

        Message content is encoded as plain text: a control marker typed into a message (``<|im_end|>``,
        ``<|start_header_id|>``, any special token of the vocabulary) becomes ordinary text tokens, so a message
        cannot close its own turn or forge another. Only the markers the template itself writes are control tokens.
        A conversation without markers in its content gets exactly ``encode(apply_chat_template(...))``.

        Args:
            messages: What ``normalize_messages`` accepts: a string (one user message) or a list of
                ``{"role", "content"}`` dicts, content a string, None or OpenAI text parts.
            add_generation_prompt: Append the header that starts the assistant's turn.
            allow_control_tokens: Opt-out for callers who deliberately write raw control text into their own
                messages: tokenize the rendered text as is, so markers in content become control tokens. Never
                set it for text from someone else.
            **kwargs: Extra template variables.

        Returns:
            The prompt's token ids (no extra BOS: templates that want one write ``bos_token``).

        Raises:
            MessageError: A message cannot be rendered (names the message index).
            ValueError: The template failed to render or called ``raise_exception``.
        """
        msgs = normalize_messages(messages)
        if allow_control_tokens:
            text = self.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, **kwargs)
            return self.encode(text, add_special_tokens=False)

        def render(contents: list[str]) -> str:
            swapped = [{**m, "content": c} for m, c in zip(msgs, contents)]
            return self.apply_chat_template(swapped, add_generation_prompt=add_generation_prompt, **kwargs)

        return self.control_text.encode_rendered([m["content"] for m in msgs], render)

    @property
    def control_text(self) -> ControlText:
        """The vocabulary's control tokens and plain-text encoding (built on first use)."""
        if self._control_text is None:
            self._control_text = ControlText(self._tok)
        return self._control_text

    def _get_template(self):
        if self._compiled_template is None:
            self._compiled_template = compile_template(self.chat_template)
        return self._compiled_template

    # -- serialization ---------------------------------------------------------------

    def to_json(self) -> str:
        """Serialize the tokenizer in Hugging Face ``tokenizer.json`` format.

        Returns:
            The JSON text.
        """
        return self._tok.to_str()

    def tokenizer_config(self) -> dict[str, Any]:
        """Return the ``tokenizer_config.json`` contents transformers/mlx-lm expect.

        Returns:
            A JSON-serializable dict (special tokens, chat template, tokenizer class).
        """
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            # Byte-level BPE round-trips spaces exactly; "cleaning" them would change text.
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        for name, tid in (
            ("bos_token", self.bos_token_id),
            ("eos_token", self.eos_token_id),
            ("unk_token", self.unk_token_id),
            ("pad_token", self.pad_token_id),
        ):
            token = self.id_to_token(tid)
            if token is not None:
                config[name] = token
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into a directory.

        Args:
            directory: Target directory (created if missing).

        Returns:
            The paths written.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tok_path = out / "tokenizer.json"
        cfg_path = out / "tokenizer_config.json"
        cfg = json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
        for p, text in ((tok_path, self.to_json()), (cfg_path, cfg)):
            with atomic_write(p, mode=0o644) as f:  # tokenizer files are not private
                f.write(text.encode("utf-8"))
        return [tok_path, cfg_path]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer from a directory with ``tokenizer.json`` (and optionally
        ``tokenizer_config.json``), such as one written by ``save`` or an HF model dir.

        Args:
            directory: The directory.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: There is no ``tokenizer.json``.
        """
        d = Path(directory)
        tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        cfg: dict[str, Any] = {}
        if (d / "tokenizer_config.json").exists():
            cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))

        def tid(name: str) -> int | None:
            value = cfg.get(name)
            if isinstance(value, dict):  # AddedToken serialized as a dict
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        eos_id = tid("eos_token")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(
            tok,
            bos_token_id=tid("bos_token"),
            eos_token_ids=eog_ids(tok, eos_id),
            eos_token_id=eos_id,
            chat_template=template,
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            pad_token_id=tid("pad_token"),
            unk_token_id=tid("unk_token"),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Same as ``tokenizer_from_gguf_metadata``."""
        return tokenizer_from_gguf_metadata(meta)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_ids={sorted(self.eos_token_ids)})"
        )


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """Build a byte-level BPE tokenizer from GGUF metadata.

    Args:
        meta: The metadata dict of ``mx.load(path, return_metadata=True)`` (values may be
            0-d ``mx.array`` scalars, str, or lists of str).

    Returns:
        A ``Tokenizer`` that splits text like llama.cpp does for the same file.

    Raises:
        ValueError: The tokenizer is not byte-level BPE (``tokenizer.ggml.model`` is not
            ``'gpt2'``), its pre-tokenizer type is unknown, or tokens/merges are missing.
    """
    tok, kwargs = gguf_vocabulary(meta)
    return Tokenizer(tok, **kwargs)
