"""Tiny random-weight models of many mlx-lm architectures, for the model test matrix (issue #16).

Each entry of `ARCHS` (tests/zoo_archs.py) is built from the installed mlx-lm's own `ModelArgs` (tiny dims: hidden
64, 2-4 layers, few experts, sliding windows of a few tokens so eviction happens in short prompts) and written as an
mlx-lm model directory by `write_zoo_model`. `reference_greedy` is mlx-lm's own greedy generation on the same directory.

    python -m tests.model_zoo --readme   # the README's table of supported architectures
    python -m tests.model_zoo --check    # build, round-trip and run every entry through mlx-lm
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import zlib
from pathlib import Path

import zkv_mlx  # noqa: F401  (loads OpenBLAS before anything imports mlx.core)

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

try:  # imported as tests.model_zoo (python -m) or as model_zoo (pytest puts tests/ on sys.path)
    from .zoo_archs import *  # noqa: F403  (the entries: ARCHS, REFUSED, EQUAL_OR_REFUSE, BY_NAME, Arch, ...)
except ImportError:
    from zoo_archs import *  # noqa: F403


def zoo_config(arch: Arch, vocab_size: int) -> dict:
    """The config.json of an entry: `COMMON` + the entry's overrides, kept to the keys its ModelArgs declares.

    Args:
        arch: the entry. vocab_size: the tokenizer's vocabulary size.
    Returns:
        A JSON-able dict with model_type first.
    """
    from mlx_lm.utils import _get_classes

    full = dict(COMMON, **arch.config, model_type=arch.model_type, vocab_size=vocab_size)
    if "text_config" in full:  # a wrapper config (llama4): the text model's vocab is the tokenizer's too
        full["text_config"] = dict(full["text_config"], vocab_size=vocab_size)
    _, args_class = _get_classes(full)
    declared = set(inspect.signature(args_class).parameters)
    return {"model_type": arch.model_type, **{k: v for k, v in full.items() if k in declared and k != "model_type"}}


def _init_value(key: str, v: mx.array, embed_std: float) -> mx.array:
    # Norm scales at one (gemma's "1 + w" norms then double, still fine); other vectors and matrices random and
    # larger than mlx-lm's defaults so greedy choices are not near-ties (as conftest.write_tiny_model).
    leaf = key.rsplit(".", 1)[-1]
    if "norm" in key and leaf == "weight" and v.ndim == 1:
        return mx.ones_like(v)
    if leaf == "A_log":  # SSM decay: A = -exp(A_log) must stay moderate for a stable recurrence
        return mx.random.uniform(-1.0, 0.5, v.shape)
    if leaf in ("dt_bias", "D", "sinks"):
        return mx.random.normal(v.shape) * 0.5
    scale = embed_std if "embed" in key else 0.15
    return (mx.random.normal(v.shape) * scale).astype(v.dtype)


def build_model(arch: Arch, vocab_size: int, seed: int = 0):
    """Instantiates the mlx-lm model of an entry with random weights.

    Returns:
        (model, config dict).
    """
    from mlx_lm.utils import _get_classes

    cfg = zoo_config(arch, vocab_size)
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(seed + zlib.crc32(arch.name.encode()))  # entries with the same shapes get different weights
    model = model_class(args_class.from_dict(cfg))
    model.load_weights([(k, _init_value(k, v, arch.embed_std)) for k, v in tree_flatten(model.parameters())])
    mx.eval(model.parameters())
    return model, cfg


def write_zoo_model(path, arch: Arch | str, tokenizer, seed: int = 0) -> Path:
    """Writes an mlx-lm model directory (config.json, model.safetensors, tokenizer files) of a zoo entry.

    The weights are written in mlx-lm's own (already sanitized) layout; `check_round_trip` verifies that
    `mlx_lm.utils.load_model` gives them back unchanged.

    Args:
        path: directory to create. arch: an `Arch` or its name. tokenizer: the bundled tokenizer (its vocab size
            sets the model's; it is saved beside the weights). seed: weight seed.
    Returns:
        The directory.
    """
    arch = BY_NAME[arch] if isinstance(arch, str) else arch
    path = Path(path)
    model, cfg = build_model(arch, tokenizer.vocab_size, seed)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    tokenizer.save(path)
    return path


def check_round_trip(path, arch: Arch | str, tokenizer, seed: int = 0) -> None:
    """Asserts that mlx-lm loads the directory back to exactly the weights `build_model` made."""
    from mlx_lm.utils import load_model

    arch = BY_NAME[arch] if isinstance(arch, str) else arch
    want, _ = build_model(arch, tokenizer.vocab_size, seed)
    got, _ = load_model(Path(path))
    a, b = dict(tree_flatten(want.parameters())), dict(tree_flatten(got.parameters()))
    assert a.keys() == b.keys(), f"{arch.name}: parameter names differ: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        assert a[k].shape == b[k].shape and mx.array_equal(a[k], b[k]).item(), f"{arch.name}: {k} differs"


def reference_greedy(path, prompt_ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """mlx-lm's own greedy generation on the model mlx-lm loads from `path`.

    Args:
        path: an mlx-lm model directory. prompt_ids: token ids. n: tokens to generate.
    Returns:
        (the n generated token ids, the raw logits of each generated step: n float32 arrays of shape [vocab]).
        Logits are captured through `generate_step`'s logits_processors hook (before mlx-lm's log-softmax).
    """
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    logits = []

    def capture(tokens, lg):
        logits.append(np.array(lg[0].astype(mx.float32)))
        return lg

    tokens = [int(t) for t, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n,
                                                logits_processors=[capture])]
    return tokens, logits[:n]  # generate_step computes one step ahead of what it yields


def readme_table() -> str:
    """The README's Markdown table of the architectures the matrix tests: one row per mlx-lm model_type with its
    category, the config variants in the matrix and the test set ("default" or "zoo_slow")."""
    rows: dict[str, list[Arch]] = {}
    for a in ARCHS + REFUSED + EQUAL_OR_REFUSE:
        rows.setdefault(a.model_type, []).append(a)
    lines = ["| mlx-lm model_type | category | config variants in the matrix | test set |", "|---|---|---|---|"]
    for mt in sorted(rows):
        entries = rows[mt]
        cats = ", ".join(dict.fromkeys(a.category for a in entries))
        variants = []
        for a in entries:
            v = a.name[len(mt) + 1:] if a.name != mt else "base"
            if a.window is not None:
                v += f" (window {a.window})"
            if a.refuses:
                v += " (must raise ModelLoadError)" if a.category == "refused" else " (equal or ModelLoadError)"
            variants.append(v)
        sets = ", ".join(dict.fromkeys("default" if a.default else "zoo_slow" for a in entries))
        lines.append(f"| {mt} | {cats} | {'; '.join(variants)} | {sets} |")
    return "\n".join(lines)


def _check_all(names: list[str]) -> int:
    """Builds, writes, round-trips and runs every entry through mlx-lm; prints one line each."""
    import tempfile

    from zkv_mlx import paths
    from zkv_mlx.models.tokenizer import tokenizer_from_gguf_metadata

    _, meta = mx.load(str(paths.default_model_path()), return_metadata=True)
    tok = tokenizer_from_gguf_metadata(meta)
    ids = tok.encode("Paged attention stores keys and values in fixed-size blocks so that")
    bad = 0
    for a in (BY_NAME[n] for n in names) if names else BY_NAME.values():
        with tempfile.TemporaryDirectory() as d:
            try:
                write_zoo_model(d, a, tok)
                check_round_trip(d, a, tok)
                toks, lg = reference_greedy(d, ids, 16)
                finite = all(np.isfinite(x).all() for x in lg)
                print(f"{a.name:22s} ok tokens={len(set(toks))} distinct finite={finite} {toks[:8]}")
                bad += (not finite) or len(set(toks)) < 2
            except Exception as e:  # noqa: BLE001  (a report of every entry, not the first failure)
                bad += 1
                print(f"{a.name:22s} FAIL {type(e).__name__}: {str(e)[:300]}")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.model_zoo", description=__doc__.splitlines()[0])
    p.add_argument("--readme", action="store_true", help="print the README's architecture table")
    p.add_argument("--check", nargs="*", metavar="NAME", help="check entries (all when none named)")
    a = p.parse_args(argv)
    if a.readme:
        print(readme_table())
        return 0
    if a.check is not None:
        return _check_all(a.check)
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
