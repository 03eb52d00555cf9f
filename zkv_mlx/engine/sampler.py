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


@mx.compile
def _greedy(logits: mx.array) -> mx.array:
    """`_argmax(_clean(logits))` fused into one compiled graph: a greedy batch's whole sampling step."""
    return _argmax(_clean(logits))


def _scale(logits: mx.array, temperature: mx.array) -> mx.array:
    """Clean logits [B, V] / temperature [B, 1], each row shifted so its max is 0: no overflow, no inf - inf.

    +inf logits become 0 and everything else -inf (their limit: they hold all the probability).
    """
    top = logits.max(axis=-1, keepdims=True)
    has_inf = top == _INF
    shifted = mx.where(has_inf, mx.where(logits == _INF, 0.0, -_INF), logits - mx.where(has_inf, 0.0, top))
    # (row - top) <= 0, so dividing by a small temperature can only underflow to -inf: an exp() of 0
    return shifted / temperature


def _column(values: list, dtype=mx.float32) -> mx.array:
    """Per-row parameters as a [B, 1] array (float32: the precision a Python float scalar gets in an MLX op)."""
    return mx.array(values, dtype=dtype)[:, None]


def _filter(logits: mx.array, params: list[SamplingParams]) -> mx.array:
    """Masks logits [B, V] outside each row's top-k / nucleus / min-p to -inf (temperature already applied).

    Per-row parameters are arrays, so the batch is one graph; a row whose filter is off goes through it unchanged
    (a top-k threshold of -inf, min-p 0 and top-p inf keep everything), so its values are bitwise those it gets
    alone, where the filter is skipped. A filter no row uses is not built.
    """
    neg = mx.array(-_INF, dtype=logits.dtype)
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k):
        # each row's k-th largest value, selected from the batch's largest k (a partial sort: ~10x cheaper than
        # sorting the vocabulary) and sorted ascending; a row without top-k gets -inf (nothing is below it)
        kmax = max(k for k in top_k if k < vocab)
        largest = mx.sort(mx.topk(logits, kmax, axis=-1), axis=-1)
        kth = mx.take_along_axis(largest, _column([kmax - min(k, kmax) for k in top_k], mx.int32), axis=-1)
        kth = mx.where(_column([k < vocab for k in top_k], mx.bool_), kth, neg)
        logits = mx.where(logits < kth, neg, logits)
    if any(p.min_p > 0.0 for p in params):
        probs = mx.softmax(logits, axis=-1)
        logits = mx.where(probs < _column([p.min_p for p in params]) * probs.max(axis=-1, keepdims=True), neg, logits)
    if any(p.top_p < 1.0 for p in params):
        order = mx.argsort(-logits, axis=-1)
        sorted_probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
        cum = mx.cumsum(sorted_probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p; the first token always stays, also when top_p
        # is below float32's smallest number and rounds to 0
        top_p = _column([p.top_p if p.top_p < 1.0 else _INF for p in params])
        keep_sorted = ((cum - sorted_probs) < top_p) | (mx.arange(vocab) == 0)
        keep = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, neg)
    return logits


def _recent(seq: Sequence, n: int) -> list[int]:
    """The last n known token ids of prompt + output (without copying the whole history: constant in context)."""
    if n <= 0:
        return []
    tail = seq.output_ids[-n:]
    return tail if len(tail) == n else seq.prompt_ids[len(tail) - n:] + tail


def _penalize(logits: mx.array, seqs: list[Sequence], inflight: mx.array | None = None) -> mx.array:
    """Applies each row's repetition penalty to the clean logits [B, V] of its recent history's tokens.

    One gather and one scatter for the batch: row i's indices are its last `repetition_context` tokens (padded
    with repeats of one of them: writing the same value twice changes nothing); rows without a penalty use
    penalty 1, which leaves every value bitwise as it is. Each penalized value is what the per-row scatter gave
    before (the same elementwise ops on the same float32 values).

    Args:
        inflight: [B] int32 tokens still being computed (pipelined decode), each the newest token of its row's
            history (the rest of the history is read from the sequences); None = every token is in `all_ids`.
    """
    active = [s.params.repetition_penalty != 1.0 and s.params.repetition_context > 0 for s in seqs]
    if not any(active):
        return logits
    late = 0 if inflight is None else 1  # the newest token is in flight: one fewer read from the history
    known = [_recent(s, s.params.repetition_context - late) if a else [0] for a, s in zip(active, seqs)]
    width = max(1, max(len(k) for k in known))
    # padding repeats an index of the same row (the in-flight token where the row has no other), so every write
    # to a position carries the same value; a row without a penalty reads and writes back position 0
    idx = mx.array([k + [k[0] if k else -1] * (width - len(k)) for k in known], dtype=mx.int32)
    if inflight is not None:
        # a NO_TOKEN row (no valid logit) fails its request and this step's token is dropped: any index will do
        newest = mx.maximum(inflight, 0).astype(mx.int32)[:, None]
        idx = mx.concatenate([mx.where(idx < 0, newest, idx), newest], axis=1)
    sel = mx.take_along_axis(logits, idx, axis=-1)
    penalty = _column([s.params.repetition_penalty if a else 1.0 for a, s in zip(active, seqs)])
    new = mx.where(sel > 0, sel / penalty, mx.where(sel < 0, sel * penalty, sel))
    # A finite logit stays finite: an overflow to -inf would drop a token that may be the only candidate, and
    # clamping at the float32 max keeps a tiny penalty's winners winning. Model-given +-inf stay as they are.
    return mx.put_along_axis(logits, idx, mx.where(mx.isinf(sel), sel, mx.clip(new, -_F32_MAX, _F32_MAX)), axis=-1)


def _key(seq: Sequence) -> mx.array:
    """The sequence's next random key (its generator starts from the seed, or from os.urandom)."""
    if seq.rng is None:
        p = seq.params
        seq.rng = mx.random.key(p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little"))
    seq.rng, sub = mx.random.split(seq.rng)
    return sub


_GREEDY_ROW = SamplingParams(temperature=1.0)  # what a greedy row of a mixed batch is filtered with (unused)


def _sample_rows(logits: mx.array, seqs: list[Sequence]) -> mx.array:
    """[B] int32 token ids (lazy) from clean, penalized logits [B, V]: one graph for the whole batch.

    Sampled rows draw with the Gumbel-max trick on their own key: argmax(logits + gumbel(key)), which is what
    `mx.random.categorical(row, key=key)` computes for one row, so a sequence's tokens under a seed do not
    depend on the rest of the batch. Greedy rows take the argmax and consume no key (in a mixed batch they
    draw from a fixed key 0, never used).
    """
    best = _argmax(logits)
    greedy = [is_greedy(s.params) for s in seqs]
    if all(greedy):
        return best
    params = [_GREEDY_ROW if g else s.params for g, s in zip(greedy, seqs)]
    scaled = _filter(_scale(logits, _column([p.temperature for p in params])), params)
    vocab = logits.shape[-1]
    keys = mx.stack([mx.random.key(0) if g else _key(s) for g, s in zip(greedy, seqs)])
    noise = mx.vmap(lambda k: mx.random.gumbel((vocab,), key=k))(keys)
    token = mx.where(_valid(logits), mx.argmax(scaled + noise, axis=-1).astype(mx.int32), NO_TOKEN)
    return token if not any(greedy) else mx.where(mx.array(greedy), best, token)


def sample(logits: mx.array, seqs: list[Sequence]) -> list[int]:
    """Picks one token per sequence.

    Args:
        logits: [B, vocab] float logits for the B sequences (may hold NaN or +-inf).
        seqs: the sequences, in the same order (their params and history are used).
    Returns:
        B token ids in [0, vocab), or NO_TOKEN for a row with no finite or +inf logit.
    """
    return sample_lazy(logits, seqs).tolist()


def sample_lazy(logits: mx.array, seqs: list[Sequence], inflight: mx.array | None = None) -> mx.array:
    """Like `sample` but returns a lazy [B] int32 array, so the next step can be built before this one is done.

    Args:
        logits: [B, vocab]. seqs: the sequences.
        inflight: [B] each sequence's newest token when it is still being computed (lazy): the repetition
            penalty counts it as the last token of the history. None = the histories are complete.
    Returns:
        [B] token ids (NO_TOKEN for a row without a valid logit), not yet evaluated.
    """
    if all(is_greedy(s.params) and s.params.repetition_penalty == 1.0 for s in seqs):
        return _greedy(logits)
    return _sample_rows(_penalize(_clean(logits), seqs, inflight), seqs)
