"""The prefix hit's 32-token forward over 4096 random cached rows, each module call synced and timed by kind:
`nn.Linear` (all projections), `nn.RMSNorm`, `nn.RoPE`, mlx-lm llama's `MLP` (its three Linears included) and
`Attention` (its projections, RoPE, pool writes and paged attention included). Not a shipped command (issue #20,
w/prefix9). "plain": the forward without the syncs (median of 7), then 5 synced forwards, seconds.

    .venv/bin/python docs/experiments/profile_hit_modules.py
"""
import time, statistics, sys
sys.path.insert(0, __import__("os").path.dirname(__file__))
import zkv_mlx
import mlx.core as mx, mlx.nn as nn
import numpy as np
from profile_chunk_attention import _Seq
from zkv_mlx.engine.runner import ModelRunner
from zkv_mlx.models.loader import load_model
from zkv_mlx.models import paged
import mlx_lm.models.llama as LL
lm = load_model(None, "float32")
print(type(lm.model), lm.n_layers)
ctx, L, bs = 4096, 32, 16
nb = -(-(ctx + L) // bs)
runner = ModelRunner(lm, 1060, bs, lm.dtype)
pool = runner.pool
for i in range(lm.n_layers):
    pool.k[i] = mx.random.normal(pool.k[i].shape).astype(lm.dtype)
    pool.v[i] = mx.random.normal(pool.v[i].shape).astype(lm.dtype)
mx.eval(pool.k, pool.v)
seq = _Seq(ctx + L, list(range(1, nb + 1)))
acc = {}
def wrap(cls, name, key):
    orig = getattr(cls, name)
    def f(self, *a, **k):
        mx.eval([x for x in a if isinstance(x, mx.array)])
        t = time.perf_counter(); out = orig(self, *a, **k); mx.eval(out)
        acc[key] = acc.get(key, 0) + time.perf_counter() - t
        return out
    return orig, f
def fwd():
    t=time.perf_counter(); mx.eval(runner.prefill(seq, ctx, ctx + L)); return time.perf_counter()-t
ow = {}
for cls, name, key in [(nn.Linear, "__call__", "linear"), (nn.RMSNorm, "__call__", "norm"), (LL.MLP, "__call__", "mlp"), (LL.Attention, "__call__", "attn_module"), (nn.RoPE, "__call__", "rope")]:
    ow[(cls,name)] = wrap(cls, name, key)
print("plain", statistics.median(fwd() for _ in range(7)))
for (cls, name), (o, f) in ow.items(): setattr(cls, name, f)
res=[]
for _ in range(5):
    acc.clear(); t = fwd(); res.append((t, dict(acc)))
for t, a in res: print(round(t,4), {k: round(v,4) for k,v in a.items()})
# lm_head / final
print(type(lm.model.model.norm) if hasattr(lm.model,'model') else None, getattr(lm.model.args, 'tie_word_embeddings', None))
