"""The GGUF vocabulary as a ``tokenizers.Tokenizer``: byte-level BPE from ``tokenizer.ggml.tokens``/``merges``,
split exactly like llama.cpp does for the same ``tokenizer.ggml.pre`` type (design.md §9)."""

from __future__ import annotations

from typing import Any, Mapping

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["eog_ids", "gguf_vocabulary"]

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


def eog_ids(tok: HFTokenizer, eos_token_id: int | None) -> set[int]:
    """End-of-generation ids: the model's eos plus llama.cpp's list of end-of-turn tokens
    that this vocabulary has as *special* tokens (a plain-text token is never a stop)."""
    ids = set() if eos_token_id is None else {int(eos_token_id)}
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for text in _EOG_TOKEN_TEXTS:
        if text in special:
            ids.add(tok.token_to_id(text))
    return ids


def gguf_vocabulary(meta: Mapping[str, Any]) -> tuple[HFTokenizer, dict[str, Any]]:
    """Builds the byte-level BPE tokenizer of GGUF metadata.

    Args:
        meta: The metadata dict of ``mx.load(path, return_metadata=True)`` (values may be
            0-d ``mx.array`` scalars, str, or lists of str).

    Returns:
        The ``tokenizers.Tokenizer`` and the keyword arguments of ``Tokenizer`` (special ids, chat template).

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
    tok = HFTokenizer(_bpe(tokens, meta.get("tokenizer.ggml.merges")))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre") or "default")
    tok.decoder = decoders.ByteLevel()
    _add_special_tokens(tok, tokens, meta.get("tokenizer.ggml.token_type"))

    bos_id = _meta_int(meta, "tokenizer.ggml.bos_token_id")
    eos_id = _meta_int(meta, "tokenizer.ggml.eos_token_id")
    add_bos = _meta_bool(meta, "tokenizer.ggml.add_bos_token", False)
    add_eos = _meta_bool(meta, "tokenizer.ggml.add_eos_token", False)
    if (add_bos and bos_id is not None) or (add_eos and eos_id is not None):
        tok.post_processor = _post_processor(tokens, bos_id if add_bos else None, eos_id if add_eos else None)
    return tok, dict(
        bos_token_id=bos_id,
        eos_token_ids=eog_ids(tok, eos_id),
        eos_token_id=eos_id,
        chat_template=meta.get("tokenizer.chat_template") or None,
        add_bos_token=add_bos,
        pad_token_id=_meta_int(meta, "tokenizer.ggml.padding_token_id"),
        unk_token_id=_meta_int(meta, "tokenizer.ggml.unknown_token_id"),
    )


def _bpe(tokens: list[str], merges_raw) -> models.BPE:
    if not merges_raw:
        raise ValueError("GGUF metadata has no tokenizer.ggml.merges: a byte-level BPE tokenizer needs them")
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
    return models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False)


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PRE_GPT2:
        return byte_level
    raise ValueError(
        f"unsupported GGUF pre-tokenizer: tokenizer.ggml.pre is {pre!r}; supported values are "
        f"{sorted(_PRE_DIGITS_THEN_GPT2 | _PRE_GPT2)}"
    )


def _add_special_tokens(tok: HFTokenizer, tokens: list[str], token_types) -> None:
    # Control tokens are matched in the input text before BPE, as llama.cpp does when parsing specials;
    # user-defined tokens are matched too but are not "special".
    types = _int_list(token_types) if token_types is not None else [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(
            f"GGUF tokenizer.ggml.token_type has {len(types)} entries but there are {len(tokens)} tokens"
        )
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == _TOKEN_TYPE_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == _TOKEN_TYPE_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def _post_processor(tokens: list[str], bos_id: int | None, eos_id: int | None):
    # Same as llama.cpp's add_bos/add_eos: one BOS before, one EOS after the whole text.
    single, pair, st = "$A", "$A $B", {}
    if bos_id is not None:
        single, pair = f"{tokens[bos_id]} {single}", f"{tokens[bos_id]} $A {tokens[bos_id]} $B"
        st[tokens[bos_id]] = bos_id
    if eos_id is not None:
        single, pair = f"{single} {tokens[eos_id]}", f"{pair} {tokens[eos_id]}"
        st[tokens[eos_id]] = eos_id
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(st.items()))
