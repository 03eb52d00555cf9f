"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, per-request seed."""

from __future__ import annotations

import os

import mlx.core as mx

from .sequence import Sequence


def _filter(logits: mx.array, top_k: int, top_p: float, min_p: float) -> mx.array:
    """Masks logits [V] outside top-k / nucleus / min-p to -inf (temperature already applied)."""
    neg = mx.array(-float("inf"), dtype=logits.dtype)
    if top_k and top_k < logits.shape[-1]:
        kth = mx.sort(logits)[-top_k]
        logits = mx.where(logits < kth, neg, logits)
    if min_p > 0.0:
        probs = mx.softmax(logits)
        logits = mx.where(probs < min_p * probs.max(), neg, logits)
    if top_p < 1.0:
        order = mx.argsort(-logits)
        sorted_probs = mx.softmax(logits[order])
        cum = mx.cumsum(sorted_probs)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep_sorted = (cum - sorted_probs) < top_p
        keep = mx.zeros(logits.shape, dtype=mx.bool_)
        keep[order] = keep_sorted
        logits = mx.where(keep, logits, neg)
    return logits


def _penalize(logits: mx.array, seq: Sequence) -> mx.array:
    p = seq.params
    recent = seq.all_ids[-p.repetition_context:]
    if not recent or p.repetition_penalty == 1.0:
        return logits
    idx = mx.array(sorted(set(recent)), dtype=mx.int32)
    sel = logits[idx]
    logits[idx] = mx.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
    return logits


def sample(logits: mx.array, seqs: list[Sequence]) -> list[int]:
    """Picks one token per sequence.

    Args:
        logits: [B, vocab] float logits for the B sequences.
        seqs: the sequences, in the same order (their params and history are used).
    Returns:
        B token ids.
    """
    logits = logits.astype(mx.float32)
    if all(s.params.temperature == 0 and s.params.repetition_penalty == 1.0 for s in seqs):
        return mx.argmax(logits, axis=-1).tolist()
    out = []
    for i, seq in enumerate(seqs):
        row = _penalize(logits[i], seq)
        p = seq.params
        if p.temperature == 0:
            out.append(int(mx.argmax(row).item()))
            continue
        row = _filter(row / p.temperature, p.top_k, p.top_p, p.min_p)
        if seq.rng is None:
            seq.rng = mx.random.key(p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little"))
        seq.rng, sub = mx.random.split(seq.rng)
        out.append(int(mx.random.categorical(row, key=sub).item()))
    return out


def can_sample_lazily(seqs: list[Sequence]) -> bool:
    """Whether `sample_lazy` applies: it needs no token values of the history (no repetition penalty)."""
    return all(s.params.repetition_penalty == 1.0 for s in seqs)


def sample_lazy(logits: mx.array, seqs: list[Sequence]) -> mx.array:
    """Like `sample` but returns a lazy [B] int32 array, so the next step can be built before this one is done.

    Args:
        logits: [B, vocab]. seqs: the sequences (none with a repetition penalty).
    Returns:
        [B] token ids, not yet evaluated.
    """
    if all(s.params.temperature == 0 for s in seqs):
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    rows = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0:
            rows.append(mx.argmax(logits[i]).astype(mx.int32))
            continue
        row = _filter(logits[i].astype(mx.float32) / p.temperature, p.top_k, p.top_p, p.min_p)
        if seq.rng is None:
            seq.rng = mx.random.key(p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little"))
        seq.rng, sub = mx.random.split(seq.rng)
        rows.append(mx.random.categorical(row, key=sub).astype(mx.int32))
    return mx.stack(rows)
