"""Not kept (issue #20, w/prefix9). Micro-benchmarks of `paged_chunk_attention`'s pieces, run against commit
f22137a's / 047b806's `kernels/prefill_cpu.py` (`_copy_stream`, `_exp_blocks`): a chain of 30 layers (K/V pools of
1060 blocks each, so they come from memory; a 576 x 576 GEMM between layers), with V's copy on a second stream
or not and the softmax on one or two threads, pieces synced, ms per layer ("chain"); then one layer's softmax on
one vs two threads on MLX-computed scores and on a numpy array ("softmax").

    .venv/bin/python docs/experiments/micro_chunk_pieces.py chain
    .venv/bin/python docs/experiments/micro_chunk_pieces.py softmax
"""
import sys as _sys

if _sys.argv[1:] == ["softmax"]:
    import zkv_mlx, mlx.core as mx
    import numpy as np, time, statistics
    from zkv_mlx.kernels import prefill_cpu as P
    q = mx.random.normal((3, 96, 64)); k = mx.random.normal((3, 4128, 64)); mx.eval(q, k)
    def run(thr):
        s = q @ k.swapaxes(-1, -2); mx.eval(s)
        sn = np.asarray(s).reshape(288, 4128)
        t = time.perf_counter()
        if thr: P._causal_exp_rows(sn, 32)
        else:
            rows, n = sn.shape; step = max(1, P._CHUNK_BYTES // (4 * n)); inv = np.empty((rows, 1), np.float32)
            tri = sn.reshape(rows // 32, 32, n)[..., n - 32:]
            np.copyto(tri, -np.inf, where=~np.tri(32, dtype=bool))
            P._exp_blocks(sn, inv, list(range(0, rows, step)), step)
        return time.perf_counter() - t
    a = np.random.rand(288, 4128).astype(np.float32)
    def runnp(thr):
        sn = a.copy()
        t = time.perf_counter()
        if thr: P._causal_exp_rows(sn, 32)
        else:
            rows, n = sn.shape; step = max(1, P._CHUNK_BYTES // (4 * n)); inv = np.empty((rows, 1), np.float32)
            P._exp_blocks(sn, inv, list(range(0, rows, step)), step)
        return time.perf_counter() - t
    for _ in range(3):
        for f in (run, runnp):
            r1 = statistics.median(f(False) for _ in range(40)); r2 = statistics.median(f(True) for _ in range(40))
            print(f.__name__, "one", round(r1*1e3,3), "two", round(r2*1e3,3))
else:
    import sys, time, statistics
    import zkv_mlx
    import mlx.core as mx, numpy as np
    from zkv_mlx.kernels import prefill_cpu as P
    H, BS, D, ctx, L, rep = 3, 16, 64, 4096, 32, 3
    nb = -(-(ctx+L)//BS); NL=30
    kps = [mx.random.normal((1060, H, BS, D)) for _ in range(NL)]; vps = [mx.random.normal((1060, H, BS, D)) for _ in range(NL)]
    mx.eval(kps, vps)
    n = ctx+L; runs=[(1, nb)]; ids=list(range(1,nb+1))
    q = mx.random.normal((1, H*rep, L, D)); mx.eval(q)
    W = mx.random.normal((576, 576)); mx.eval(W)
    acc={}
    def add(k,t): acc[k]=acc.get(k,0)+t
    def new_pieces(q, k_pool, v_pool, runs, block_ids, length, scale, stream=True, thr=True):
        _, hq, L, d = q.shape
        hkv = k_pool.shape[1]; rep = hq // hkv
        T0=time.perf_counter()
        if stream:
            with mx.stream(P._copy_stream()):
                v = P._heads(v_pool, runs, block_ids, length)
            mx.async_eval(v)
        else:
            v = P._heads(v_pool, runs, block_ids, length)
        k = P._heads(k_pool, runs, block_ids, length)
        qs = (q[0].astype(mx.float32) * scale).reshape(hkv, rep * L, d)
        mx.eval(k); T1=time.perf_counter(); add("kcopy", T1-T0)
        s = qs @ k.swapaxes(-1, -2)
        mx.eval(s); T2=time.perf_counter(); add("scores", T2-T1)
        sn = np.asarray(s).reshape(hkv * rep * L, length)
        if thr: inv = P._causal_exp_rows(sn, L)
        else:
            rows=sn.shape[0]; step = max(1, P._CHUNK_BYTES // (4 * length)); inv = np.empty((rows, 1), np.float32)
            tri = sn.reshape(rows // L, L, length)[..., length - L:]
            np.copyto(tri, -np.inf, where=~np.tri(L, dtype=bool))
            P._exp_blocks(sn, inv, list(range(0, rows, step)), step); inv = 1/inv
        T3=time.perf_counter(); add("exp", T3-T2)
        mx.eval(v); T4=time.perf_counter(); add("vwait", T4-T3)
        out = (s @ v) * mx.array(inv.reshape(hkv, rep * L, 1))
        mx.eval(out); T5=time.perf_counter(); add("pv", T5-T4)
        return out.reshape(1, hq, L, d).astype(q.dtype)
    def chain(**kw):
        x = q
        t=time.perf_counter()
        for l in range(NL):
            x = new_pieces(x, kps[l], vps[l], runs, ids, n, 0.125, **kw)
            x = (x.reshape(L, 576) @ W).reshape(1, H*rep, L, D) * 0.01
        mx.eval(x)
        return (time.perf_counter()-t)*1e3/NL
    for kw in [dict(stream=True, thr=True), dict(stream=False, thr=False), dict(stream=True, thr=False), dict(stream=False, thr=True)]*2:
        res=[]; acc.clear()
        for r in range(6): res.append(chain(**kw))
        print(kw, round(statistics.median(res),3), {k: round(v*1e3/NL/6,3) for k,v in acc.items()})
