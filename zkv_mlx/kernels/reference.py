"""Pure-MLX reference attention over the paged pool (design.md §3-4).

Every kernel variant is checked against these functions; on Linux (and whenever Metal is unavailable or
disabled) they are the production path.
"""

from __future__ import annotations

import mlx.core as mx

_LOG2E = 1.4426950408889634
# 2^f on [-0.5, 0.5]: Taylor series of e^(f ln 2) to degree 6 (relative error < 3e-7 after range reduction).
_C = (1.0, 0.6931471805599453, 0.2402265069591007, 0.05550410866482158, 0.009618129107628477,
      0.0013333558146428443, 0.00015403530393381606)


def _exp2_parts(x):
    y = mx.maximum(x * _LOG2E, -127.0)
    n = mx.round(y)
    f = y - n
    p = _C[6]
    for c in _C[5::-1]:
        p = p * f + c
    return p, (n.astype(mx.int32) + 127) << 23


_exp2_parts_compiled = mx.compile(_exp2_parts, shapeless=True)


def _exp_inline(x: mx.array) -> mx.array:
    # exp_nonpositive's ops, for use inside an mx.compile'd function (fused with the caller's graph)
    p, bits = _exp2_parts(x)
    return p * mx.view(bits, mx.float32)


def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0 (and -inf -> 0), as a fused polynomial.

    MLX's CPU `exp` is scalar (~30 ns an element here) and dominates attention on the CPU; this runs ~9x faster
    with relative error < 3e-7. The exponent bits are assembled outside the compiled part (shapeless compile
    cannot infer `view`'s shape); inputs are flattened so one compiled kernel serves every shape.
    """
    p, bits = _exp2_parts_compiled(x.reshape(-1))
    return (p * mx.view(bits, mx.float32)).reshape(x.shape)


def softmax(s: mx.array, axis: int = -1) -> mx.array:
    """Softmax in float32 with the fast exp (rows must have at least one finite entry)."""
    s = s.astype(mx.float32)
    e = exp_nonpositive(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def paged_attention_reference(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: mx.array,
                              context_lens: mx.array, scale: float, max_len: int | None = None,
                              return_mass: bool = False):
    """Decode attention: one query token per sequence over its paged K/V.

    Args:
        q: [B, n_heads, 1, head_dim] queries (rope applied).
        k_pool, v_pool: [num_blocks, n_kv_heads, block_size, head_dim].
        block_tables: [B, max_blocks] int32 (rows padded with any valid block id).
        context_lens: [B] int32 number of valid positions per sequence (including the current token).
        scale: softmax scale.
        max_len: max(context_lens) if the caller knows it (saves a device sync).
        return_mass: also return the attention mass per block-table entry (`reference_mass.attention_mass`).
    Returns:
        [B, n_heads, 1, head_dim] in q's dtype; with return_mass, (that, [B, max_blocks] float32).
    """
    B, nb = block_tables.shape
    _, h_kv, bs, d = k_pool.shape
    # [B, nb, H, BS, D] -> [B, H, nb*BS, D]
    k = k_pool[block_tables].transpose(0, 2, 1, 3, 4).reshape(B, h_kv, nb * bs, d)
    v = v_pool[block_tables].transpose(0, 2, 1, 3, 4).reshape(B, h_kv, nb * bs, d)
    if max_len is None:
        max_len = int(context_lens.max().item())
    k, v = k[:, :, :max_len], v[:, :, :max_len]
    if B == 1:
        mask = None  # the slice already is the whole valid context
    else:
        # [B, 1, 1, L]: True where the position belongs to the sequence
        mask = (mx.arange(max_len)[None, :] < context_lens[:, None])[:, None, None, :]
    out = mx.fast.scaled_dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, mask=mask)
    if not return_mass:
        return out
    from .reference_mass import attention_mass

    return out, attention_mass(q, k_pool, block_tables, context_lens, scale)


def single_decode_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_table: list[int],
                            length: int, scale: float, mass_out: list | None = None,
                            plan: tuple | None = None) -> mx.array:
    """Decode attention for one sequence, reading its K/V blocks once (CPU-friendly reference).

    The pool layout [num_blocks, H_kv, BS, D] keeps a sequence's rows for one head non-contiguous, so
    instead of copying K/V into [H_kv, L, D] this computes q against every row of the sequence's blocks in one
    GEMM (all heads: cheap here, the GEMM is bound by reading K), keeps each query head's own kv head (the
    block diagonal) before the softmax (exp is the costly op on the CPU), and multiplies V by the block-diagonal
    probabilities. Contiguous runs of block ids are slices of the pool, so K/V are never copied (only the small
    score rows are concatenated across runs); many scattered blocks are gathered instead.

    Args:
        q: [1, n_heads, 1, D]; k_pool, v_pool: the layer's pool arrays.
        block_table: the sequence's block ids (python ints). length: valid positions (incl. this token).
        mass_out: if a list, gets the attention mass per block [nb] (float32, summed over the query heads).
        plan: `decode_plan(block_table, length, block_size)`, computed once per step for all layers.
    Returns:
        [1, n_heads, 1, D] in q's dtype.
    """
    _, h_kv, bs, d = k_pool.shape
    n_heads = q.shape[1]
    rep = n_heads // h_kv
    nb = -(-length // bs)
    runs, length_arr = plan or decode_plan(block_table, length, bs)
    if len(runs) > _MAX_RUNS:  # scattered blocks: one gather beats many small slices
        idx = mx.array(block_table[:nb], dtype=mx.int32)
        parts = [(k_pool[idx], v_pool[idx], nb)]
    else:  # slices of the pool: no copy of K/V
        parts = [(k_pool[a:a + n], v_pool[a:a + n], n) for a, n in runs]
    q2 = q.reshape(n_heads, d) * scale
    # every query head against every row of each run: [H_kv, rep, n, H_kv, BS]
    scores = [(q2 @ k.reshape(n * h_kv * bs, d).astype(q.dtype).T).reshape(h_kv, rep, n, h_kv, bs)
              for k, _, n in parts]
    s = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=2)
    p = _decode_probs(s, length_arr)  # [rep, nb * BS, H_kv] float32
    if mass_out is not None:
        mass_out.append(p.reshape(rep, nb, bs, h_kv).sum(axis=(0, 2, 3)))
    eye = _eye(h_kv, q.dtype)
    out, start = None, 0
    for _, v, n in parts:
        pr = _spread(p[:, start * bs:(start + n) * bs].reshape(rep, n, bs, h_kv), eye)
        o = pr @ v.reshape(n * h_kv * bs, d).astype(q.dtype)
        out = o if out is None else out + o
        start += n
    return out.reshape(1, n_heads, 1, d)


_MAX_RUNS = 8


def decode_plan(block_table: list[int], length: int, block_size: int) -> tuple:
    """What `single_decode_attention` derives from a table and length: (contiguous runs, length array)."""
    return _runs(block_table[: -(-length // block_size)]), mx.array(length, dtype=mx.int32)

# Sequences up to this many positions decode through `grouped_decode_attention` (batched, padded per group of
# equal block count); longer ones through `single_decode_attention` (no K/V copy).
GROUPED_MAX_LEN = 512


def grouped_decode_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array, tables: mx.array,
                             lens: mx.array, scale: float) -> mx.array:
    """Decode attention for G sequences that all span the same number of blocks, in one batched graph.

    The K/V of the group are gathered into [G, H_kv, nb * BS, D] (short contexts: a small copy), so a batch of
    sequences costs a handful of ops per layer instead of a handful per sequence. Every shape depends only on
    (G, nb), and each sequence's rows are computed independently, so a sequence gets bitwise the same result
    alone (G = 1) as inside a group.

    Args:
        q: [G, n_heads, 1, D]. tables: [G, nb] int32 block ids. lens: [G] int32 valid positions (each in
            ((nb - 1) * BS, nb * BS]).
    Returns:
        [G, n_heads, 1, D] in q's dtype.
    """
    g, nb = tables.shape
    _, h_kv, bs, d = k_pool.shape
    n_heads = q.shape[1]
    k = k_pool[tables].transpose(0, 2, 1, 3, 4).reshape(g, h_kv, nb * bs, d).astype(q.dtype)
    v = v_pool[tables].transpose(0, 2, 1, 3, 4).reshape(g, h_kv, nb * bs, d).astype(q.dtype)
    qg = (q.reshape(g, h_kv, n_heads // h_kv, d) * scale)  # query heads grouped by their kv head
    p = _masked_probs(qg @ k.swapaxes(-1, -2), lens)  # [G, H_kv, rep, L] float32
    return (p.astype(q.dtype) @ v).reshape(g, n_heads, 1, d)


@mx.compile
def _masked_probs(s: mx.array, lens: mx.array) -> mx.array:
    """Softmax over the last axis of [G, H, R, L] scores, positions >= lens[g] masked (fast exp)."""
    s = s.astype(mx.float32)
    s = mx.where(mx.arange(s.shape[-1])[None, None, None, :] < lens[:, None, None, None], s, -float("inf"))
    e = _exp_inline(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@mx.compile
def _decode_probs(s: mx.array, length: mx.array) -> mx.array:
    """Block diagonal of the scores, masked past `length`, softmax over positions (one fused graph per shape).

    s: [H_kv, rep, n, H_kv, BS] -> [rep, n * BS, H_kv] float32 probabilities.
    """
    h, rep, n, _, bs = s.shape
    s = mx.diagonal(s, 0, 0, 3).reshape(rep, n * bs, h).astype(mx.float32)  # each query head's own kv head
    s = mx.where((mx.arange(n * bs) < length)[None, :, None], s, -float("inf"))
    e = _exp_inline(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@mx.compile
def _spread(p: mx.array, eye: mx.array) -> mx.array:
    """[rep, n, BS, H_kv] probabilities -> [H_q, n * H_kv * BS] over the block diagonal, in eye's dtype."""
    rep, n, bs, h = p.shape
    pr = p.astype(eye.dtype).transpose(3, 0, 1, 2)[:, :, :, None, :]  # [H_kv, rep, n, 1, BS]
    return (pr * eye).reshape(h * rep, n * h * bs)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Splits block ids into ascending contiguous runs: [(first id, count), ...]."""
    runs = []
    for b in ids:
        if runs and b == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return [(a, n) for a, n in runs]


_EYES: dict = {}


def _eye(h: int, dtype) -> mx.array:
    key = (h, dtype)
    if key not in _EYES:
        _EYES[key] = (mx.arange(h)[:, None] == mx.arange(h)[None, :]).astype(dtype).reshape(h, 1, 1, h, 1)
    return _EYES[key]


# Prefill attention lives in prefill.py (tiles, windows, sinks); the old name stays for its callers.
from .prefill import prefill_attention as prefill_attention_reference  # noqa: E402,F401
