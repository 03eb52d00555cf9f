"""Not kept (issue #20, w/prefix9). Runs only against commit 047b806's tree (its `prefill_cpu._patch`,
`models.attention.PREFETCH_NEXT_LAYER`): the hit's 32-token forward over 4096 random cached rows with
`paged_chunk_attention` replaced by a copy synced piece by piece ("pre": the layer's inputs, "prefetch_wait",
"kv": K/V copies or the patch of prefetched ones, "scores", "exp", "pv"), next-layer prefetch on / off
alternating; forward ms and pieces summed over the layers, medians of 5.

    git checkout 047b806 -- zkv_mlx && .venv/bin/python docs/experiments/profile_prefetch_pieces.py
"""
import sys, time, statistics
sys.path.insert(0, __import__("os").path.dirname(__file__))
import zkv_mlx
import mlx.core as mx, numpy as np
from ab_hit_overheads import _Seq
from zkv_mlx.engine.runner import ModelRunner
from zkv_mlx.models.loader import load_model
from zkv_mlx.models import paged, attention
from zkv_mlx.kernels import prefill_cpu as P
lm = load_model(None, "float32")
ctx, L, bs = 4096, 32, 16
nb = -(-(ctx + L) // bs)
runner = ModelRunner(lm, 1060, bs, lm.dtype)
pool = runner.pool
for i in range(lm.n_layers):
    pool.k[i] = mx.random.normal(pool.k[i].shape).astype(lm.dtype); pool.v[i] = mx.random.normal(pool.v[i].shape).astype(lm.dtype)
mx.eval(pool.k, pool.v)
seq = _Seq(ctx + L, list(range(1, nb + 1)))
acc = {}
def add(k, t): acc[k] = acc.get(k, 0) + t
def pieces(q, k_pool, v_pool, runs, block_ids, length, scale, prefetched=None):
    _, hq, L, d = q.shape; hkv = k_pool.shape[1]; rep = hq // hkv
    T = [time.perf_counter()]
    mx.eval(q); T.append(time.perf_counter())
    if prefetched is not None:
        mx.eval(prefetched); T.append(time.perf_counter())
        first = (length - L) // bs
        k, v = (P._patch(buf, pool, block_ids[first:-(-length // bs)], first * bs, length) for buf, pool in zip(prefetched, (k_pool, v_pool)))
    else:
        T.append(time.perf_counter())
        k = P._heads(k_pool, runs, block_ids, length); v = P._heads(v_pool, runs, block_ids, length)
    mx.eval(k, v); T.append(time.perf_counter())
    qs = (q[0].astype(mx.float32) * scale).reshape(hkv, rep * L, d)
    s = qs @ k.swapaxes(-1, -2); mx.eval(s); T.append(time.perf_counter())
    sn = np.asarray(s).reshape(hkv * rep * L, length); inv = P._causal_exp_rows(sn, L); T.append(time.perf_counter())
    out = (s @ v) * mx.array(inv.reshape(hkv, rep * L, 1)); mx.eval(out); T.append(time.perf_counter())
    for i, nm in enumerate(["pre", "prefetch_wait", "kv", "scores", "exp", "pv"]): add(nm, T[i+1]-T[i])
    return out.reshape(1, hq, L, d).astype(q.dtype)
attention.paged_chunk_attention = pieces
for pf in (True, False, True, False):
    attention.PREFETCH_NEXT_LAYER = pf
    res = []
    for r in range(6):
        acc.clear(); t = time.perf_counter(); mx.eval(runner.prefill(seq, ctx, ctx + L)); res.append((time.perf_counter()-t, dict(acc)))
    res = res[1:]
    print("prefetch", pf, round(statistics.median(x[0] for x in res)*1e3,1), {k: round(statistics.median(x[1][k] for x in res)*1e3,1) for k in res[0][1]})
