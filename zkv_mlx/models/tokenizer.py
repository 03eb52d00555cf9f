"""Tokenizer: byte-level BPE built from GGUF metadata, chat templates, streaming decode.

The GGUF file carries the whole tokenizer (tokens, merges, token types, chat
template), so no Hugging Face files are needed. We rebuild it as a
``tokenizers.Tokenizer`` configured to split text exactly like llama.cpp does
for the same ``tokenizer.ggml.pre`` type, and can write it back out as a
``tokenizer.json`` for an mlx-lm model directory.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..storage.atomic import atomic_write
from .control_text import ControlText
from .messages import normalize_messages

__all__ = ["Tokenizer", "StreamDetokenizer", "tokenizer_from_gguf_metadata", "CHATML_TEMPLATE"]

# Used when a model ships no chat template: plain ChatML, the format of most small instruct models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp treats any of these token texts as end-of-generation, whatever the GGUF eos id
# says (llama-vocab.cpp, special_eog_ids); matching it keeps generation stopping identical.
_EOG_TOKEN_TEXTS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
)

# GGUF token types (gguf.TokenType): 3 = control (special), 4 = user-defined (added, not special).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# tokenizer.ggml.pre values whose llama.cpp split is {"\p{N}", <GPT-2 regex>}: every digit alone,
# then the GPT-2 regex. Digits(individual_digits=True) + ByteLevel(use_regex=True) is the same.
_PRE_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)
# Values whose llama.cpp split is the GPT-2 regex alone ("default" is llama.cpp's fallback
# when the key is absent).
_PRE_GPT2 = frozenset({"gpt2", "default", "mpt", "olmo", "jais", "trillion"})

# Longest run of tokens the stream detokenizer holds back waiting for a UTF-8 sequence to
# complete. A character is at most 4 bytes and every token is at least 1 byte, so a real
# incomplete character never needs more; past this the U+FFFD is genuine and is emitted.
_MAX_PENDING_TOKENS = 8


def _scalar(value: Any) -> Any:
    """Return a Python scalar from a 0-d mx.array / numpy value / Python scalar."""
    return value.item() if hasattr(value, "item") else value


def _int_list(value: Any) -> list[int]:
    """Return a list of ints from an mx.array, numpy array or sequence."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(v) for v in value]


def _meta_int(meta: Mapping[str, Any], key: str) -> int | None:
    value = meta.get(key)
    return None if value is None else int(_scalar(value))


def _meta_bool(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key)
    return default if value is None else bool(_scalar(value))


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
        from jinja2 import TemplateError

        template = self._get_template()
        try:
            return template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                raise_exception=_raise_exception,
                **kwargs,
            )
        except TemplateError as e:
            raise ValueError(f"chat template failed to render: {e}") from e

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
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._compiled_template = env.from_string(self.chat_template or CHATML_TEMPLATE)
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
            eos_token_ids=_eog_ids(tok, eos_id),
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


def _raise_exception(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # Same as transformers: keep non-ASCII text as is (Jinja's own tojson escapes it to \uXXXX).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _eog_ids(tok: HFTokenizer, eos_token_id: int | None) -> set[int]:
    """End-of-generation ids: the model's eos plus llama.cpp's list of end-of-turn tokens
    that this vocabulary has as *special* tokens (a plain-text token is never a stop)."""
    ids = set() if eos_token_id is None else {int(eos_token_id)}
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for text in _EOG_TOKEN_TEXTS:
        if text in special:
            ids.add(tok.token_to_id(text))
    return ids


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
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer: tokenizer.ggml.model is {model!r}; only byte-level BPE "
            "GGUF tokenizers (tokenizer.ggml.model = 'gpt2') are supported"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens: the file carries no tokenizer vocabulary")
    tokens = list(tokens)
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ValueError("GGUF metadata has no tokenizer.ggml.merges: a byte-level BPE tokenizer needs them")
    pre = meta.get("tokenizer.ggml.pre") or "default"

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens has duplicate entries; cannot build a BPE vocabulary")
    merges = []
    for m in merges_raw:
        # Byte-level tokens never contain a literal space (it is mapped to 'Ġ'), so one split is exact.
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"malformed GGUF merge {m!r}: expected two tokens separated by a space")
        merges.append((a, b))

    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False)
    tok = HFTokenizer(bpe)

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _PRE_GPT2:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer: tokenizer.ggml.pre is {pre!r}; supported values are "
            f"{sorted(_PRE_DIGITS_THEN_GPT2 | _PRE_GPT2)}"
        )
    tok.decoder = decoders.ByteLevel()

    # Special tokens: control tokens are matched in the input text before BPE, as llama.cpp
    # does when parsing specials; user-defined tokens are matched too but are not "special".
    token_types = meta.get("tokenizer.ggml.token_type")
    types = _int_list(token_types) if token_types is not None else [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(
            f"GGUF tokenizer.ggml.token_type has {len(types)} entries but there are {len(tokens)} tokens"
        )
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if t == _TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == _TOKEN_TYPE_USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    bos_id = _meta_int(meta, "tokenizer.ggml.bos_token_id")
    eos_id = _meta_int(meta, "tokenizer.ggml.eos_token_id")
    add_bos = _meta_bool(meta, "tokenizer.ggml.add_bos_token", False)
    add_eos = _meta_bool(meta, "tokenizer.ggml.add_eos_token", False)
    if (add_bos and bos_id is not None) or (add_eos and eos_id is not None):
        # Same as llama.cpp's add_bos/add_eos: one BOS before, one EOS after the whole text.
        single, pair, st = "$A", "$A $B", {}
        if add_bos and bos_id is not None:
            single, pair = f"{tokens[bos_id]} {single}", f"{tokens[bos_id]} $A {tokens[bos_id]} $B"
            st[tokens[bos_id]] = bos_id
        if add_eos and eos_id is not None:
            single, pair = f"{single} {tokens[eos_id]}", f"{pair} {tokens[eos_id]}"
            st[tokens[eos_id]] = eos_id
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(st.items())
        )

    return Tokenizer(
        tok,
        bos_token_id=bos_id,
        eos_token_ids=_eog_ids(tok, eos_id),
        eos_token_id=eos_id,
        chat_template=meta.get("tokenizer.chat_template") or None,
        add_bos_token=add_bos,
        pad_token_id=_meta_int(meta, "tokenizer.ggml.padding_token_id"),
        unk_token_id=_meta_int(meta, "tokenizer.ggml.unknown_token_id"),
    )
