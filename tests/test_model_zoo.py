"""The model zoo itself (tests/model_zoo.py): coverage, round trip through mlx-lm, a usable reference, README table."""

from pathlib import Path

import numpy as np
import pytest

import model_zoo as zoo

ROOT = Path(__file__).resolve().parents[1]

# The issue's list: every one must be in the matrix.
REQUIRED = {"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3",
            "gpt_oss", "olmo2", "granite", "cohere2", "starcoder2", "internlm2", "exaone4", "smollm3", "glm4",
            "qwen3_next", "lfm2", "falcon_h1", "deepseek_v3"}


def test_matrix_covers_the_issue_and_each_category_in_the_default_set():
    types = {a.model_type for a in zoo.ARCHS}
    assert REQUIRED <= types, sorted(REQUIRED - types)
    assert len(types) >= 35
    default = zoo.default_set()
    assert {a.category for a in default} == {"paged", "window", "sinks", "hybrid", "mla"}
    assert 8 <= len(default) <= 12
    names = [a.name for a in zoo.ARCHS + zoo.REFUSED + zoo.EQUAL_OR_REFUSE]
    assert len(names) == len(set(names))
    for a in zoo.ARCHS:  # a window of a few tokens (or one wider than a 16-token prefill chunk, on purpose)
        if a.category == "window":
            assert a.window is not None and (a.window <= 8 or a.window > 16), a.name
    assert {"llama-sliding", "qwen3-tied", "llama-rope-llama3", "llama-rope-linear", "llama-rope-yarn",
            "gemma3_text"} <= set(names)


@pytest.mark.parametrize("name", [pytest.param(a.name, marks=() if a.default else (pytest.mark.zoo_slow,))
                                  for a in zoo.BY_NAME.values()])
def test_zoo_model_round_trips_and_mlx_lm_runs_it(name, tmp_path, bundled_tokenizer):
    arch = zoo.BY_NAME[name]
    path = zoo.write_zoo_model(tmp_path / name, arch, bundled_tokenizer)
    zoo.check_round_trip(path, arch, bundled_tokenizer)  # mlx-lm's load_model (sanitize included) gives it back
    ids = bundled_tokenizer.encode("The quick brown fox jumps over the lazy dog, twice.")
    tokens, logits = zoo.reference_greedy(path, ids, 8)
    assert len(tokens) == len(logits) == 8
    assert all(lg.shape == (bundled_tokenizer.vocab_size,) and np.isfinite(lg).all() for lg in logits)
    assert len(set(tokens)) >= 3, f"degenerate init: {tokens}"
    assert tokens == [int(np.argmax(lg)) for lg in logits]  # the captured logits are the ones greedy chose from


def test_readme_architecture_table_is_generated_from_the_matrix():
    text = (ROOT / "README.md").read_text()
    start, end = text.index(zoo.README_START), text.index(zoo.README_END)
    assert text[start + len(zoo.README_START):end].strip() == zoo.readme_table(), \
        "README's architecture table is stale: paste the output of `python -m tests.model_zoo --readme`"
