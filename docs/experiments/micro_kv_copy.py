"""One layer's K/V copy from the pool into the GEMM layout [H_kv, rows, D], MLX's (`prefill_cpu._heads`) vs
numpy's into reused buffers (as `prefill_cpu._copied_heads` does since 45e17d0) vs numpy's into fresh MLX
buffers; pools of 30 layers x 1060 blocks so they come from memory; ms per layer, medians of 9 passes over the
30 layers. Not a shipped command (issue #20, w/prefix9).

    .venv/bin/python docs/experiments/micro_kv_copy.py
"""
import zkv_mlx, time, statistics
import mlx.core as mx, numpy as np
from zkv_mlx.kernels import prefill_cpu as P
H, BS, D, n = 3, 16, 64, 4128
nb = n // BS; NL = 30
kps = [mx.random.normal((1060, H, BS, D)) for _ in range(NL)]; vps = [mx.random.normal((1060, H, BS, D)) for _ in range(NL)]
mx.eval(kps, vps)
runs = [(1, nb)]; ids = list(range(1, nb + 1))
bufs = [mx.zeros((H, n, D)) for _ in range(2)]; mx.eval(bufs)
bn = [np.asarray(b) for b in bufs]
print(bn[0].flags.writeable, np.shares_memory(bn[0], np.asarray(bufs[0])))
def mlx_copy():
    for l in range(NL):
        k = P._heads(kps[l], runs, ids, n); v = P._heads(vps[l], runs, ids, n); mx.eval(k, v)
def np_copy():
    for l in range(NL):
        mx.eval(kps[l], vps[l])
        for src, dst in ((kps[l], bn[0]), (vps[l], bn[1])):
            s = np.asarray(src)[1:1 + nb]  # [nb, H, BS, D]
            np.copyto(dst.reshape(H, nb, BS, D), s.swapaxes(0, 1))
def np_copy_fresh():
    for l in range(NL):
        k = mx.zeros((H, n, D)); v = mx.zeros((H, n, D)); mx.eval(k, v)
        for src, dst in ((kps[l], np.asarray(k)), (vps[l], np.asarray(v))):
            np.copyto(dst.reshape(H, nb, BS, D), np.asarray(src)[1:1 + nb].swapaxes(0, 1))
def med(f):
    ts = []
    for _ in range(9):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3 / NL, 3)
for _ in range(2):
    print("mlx", med(mlx_copy), "np_reuse", med(np_copy), "np_fresh", med(np_copy_fresh))
k = P._heads(kps[3], runs, ids, n); mx.eval(k)
np.copyto(bn[0].reshape(H, nb, BS, D), np.asarray(kps[3])[1:1+nb].swapaxes(0, 1))
print("equal", mx.array_equal(k, bufs[0]).item())
