"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, per-request seed.

Numeric edges get their mathematical limits rather than float32 accidents:
- a temperature below GREEDY_BELOW is greedy (vLLM's `_SAMPLING_EPS`); above it logits are shifted by their
  max before dividing, so logits / temperature cannot overflow into inf - inf = NaN;
- NaN logits are never picked (they count as -inf); +inf logits (or a penalty that overflows to +inf) take
  all the probability, shared among them;
- a row with no finite or +inf logit (all NaN / -inf) yields NO_TOKEN, never token 0 (often EOS): the engine
  fails that request with a SamplingError.
"""

from __future__ import annotations

import os

import mlx.core as mx

from .sequence import SamplingParams, Sequence

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily
NO_TOKEN = -2        # "this row has no token to pick" (never a vocabulary id)

_INF = float("inf")
_F32_MAX = 3.4028234663852886e38  # largest finite float32


def is_greedy(p: SamplingParams) -> bool:
    """Whether `p` picks the argmax (temperature 0, or below GREEDY_BELOW)."""
    return p.temperature < GREEDY_BELOW


def _clean(logits: mx.array) -> mx.array:
    """float32 logits with NaN as -inf (a NaN from the model is no evidence for a token)."""
    logits = logits.astype(mx.float32)
    return mx.where(mx.isnan(logits), -_INF, logits)


def _valid(logits: mx.array) -> mx.array:
    """[...] bool: the rows (last axis) of clean logits that have a token to pick (any value above -inf)."""
    return logits.max(axis=-1) > -_INF


def _argmax(logits: mx.array) -> mx.array:
    """Greedy ids of clean logits [..., V] as int32, NO_TOKEN for rows without a valid logit."""
    return mx.where(_valid(logits), mx.argmax(logits, axis=-1).astype(mx.int32), NO_TOKEN)


def _scale(row: mx.array, temperature: float) -> mx.array:
    """Clean logits [V] / temperature, shifted so the max is 0: no overflow, no inf - inf.

    +inf logits become 0 and everything else -inf (their limit: they hold all the probability).
    """
    top = row.max()
    has_inf = top == _INF
    shifted = mx.where(has_inf, mx.where(row == _INF, 0.0, -_INF), row - mx.where(has_inf, 0.0, top))
    # (row - top) <= 0, so dividing by a small temperature can only underflow to -inf: an exp() of 0
    return shifted / temperature


def _filter(logits: mx.array, top_k: int, top_p: float, min_p: float) -> mx.array:
    """Masks logits [V] outside top-k / nucleus / min-p to -inf (temperature already applied)."""
    neg = mx.array(-_INF, dtype=logits.dtype)
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
        # keep the smallest prefix whose mass reaches top_p; the first token always stays, also when top_p
        # is below float32's smallest number and rounds to 0
        keep_sorted = (cum - sorted_probs) < top_p
        keep_sorted[0] = True
        keep = mx.zeros(logits.shape, dtype=mx.bool_)
        keep[order] = keep_sorted
        logits = mx.where(keep, logits, neg)
    return logits


def _penalize(logits: mx.array, seq: Sequence) -> mx.array:
    """Applies the repetition penalty to the clean logits [V] of the recent history's tokens."""
    p = seq.params
    recent = seq.all_ids[-p.repetition_context:] if p.repetition_context else []
    if not recent or p.repetition_penalty == 1.0:
        return logits
    idx = mx.array(sorted(set(recent)), dtype=mx.int32)
    sel = logits[idx]
    new = mx.where(sel > 0, sel / p.repetition_penalty, mx.where(sel < 0, sel * p.repetition_penalty, sel))
    # A finite logit stays finite: an overflow to -inf would drop a token that may be the only candidate, and
    # clamping at the float32 max keeps a tiny penalty's winners winning. Model-given +-inf stay as they are.
    logits[idx] = mx.where(mx.isinf(sel), sel, mx.clip(new, -_F32_MAX, _F32_MAX))
    return logits


def _key(seq: Sequence) -> mx.array:
    """The sequence's next random key (its generator starts from the seed, or from os.urandom)."""
    if seq.rng is None:
        p = seq.params
        seq.rng = mx.random.key(p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little"))
    seq.rng, sub = mx.random.split(seq.rng)
    return sub


def _sample_row(row: mx.array, seq: Sequence) -> mx.array:
    """One token id (int32 scalar, lazy) from the clean, penalized logits [V] of `seq`."""
    p = seq.params
    if is_greedy(p):
        return _argmax(row)
    scaled = _filter(_scale(row, p.temperature), p.top_k, p.top_p, p.min_p)
    token = mx.random.categorical(scaled, key=_key(seq)).astype(mx.int32)
    return mx.where(_valid(row), token, NO_TOKEN)


def sample(logits: mx.array, seqs: list[Sequence]) -> list[int]:
    """Picks one token per sequence.

    Args:
        logits: [B, vocab] float logits for the B sequences (may hold NaN or +-inf).
        seqs: the sequences, in the same order (their params and history are used).
    Returns:
        B token ids in [0, vocab), or NO_TOKEN for a row with no finite or +inf logit.
    """
    logits = _clean(logits)
    if all(is_greedy(s.params) and s.params.repetition_penalty == 1.0 for s in seqs):
        return _argmax(logits).tolist()
    return mx.stack([_sample_row(_penalize(logits[i], seq), seq) for i, seq in enumerate(seqs)]).tolist()


def can_sample_lazily(seqs: list[Sequence]) -> bool:
    """Whether `sample_lazy` applies: it needs no token values of the history (no repetition penalty)."""
    return all(s.params.repetition_penalty == 1.0 for s in seqs)


def sample_lazy(logits: mx.array, seqs: list[Sequence]) -> mx.array:
    """Like `sample` but returns a lazy [B] int32 array, so the next step can be built before this one is done.

    Args:
        logits: [B, vocab]. seqs: the sequences (none with a repetition penalty).
    Returns:
        [B] token ids (NO_TOKEN for a row without a valid logit), not yet evaluated.
    """
    logits = _clean(logits)
    if all(is_greedy(s.params) for s in seqs):
        return _argmax(logits)
    return mx.stack([_sample_row(logits[i], seq) for i, seq in enumerate(seqs)])
