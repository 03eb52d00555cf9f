"""A prefix hit in the engine (as `bench prefix`): its first token, then the same with each layer synced before
and after its attention ("pre": everything since the previous attention, "attn"), or before and after its pool
writes ("to_write", "write"), alternating. Not a shipped command (issue #20, w/prefix9). Seconds per hit.

    .venv/bin/python docs/experiments/profile_hit_engine.py
"""
import time, sys, os, statistics

from zkv_mlx import ZKV
from zkv_mlx.bench.common import bench_tokens
from zkv_mlx.bench.prefix import ttft
import zkv_mlx.models.attention as A
import zkv_mlx.models.paged as PG
from zkv_mlx.storage import kv_pool as KP
import mlx.core as mx
m = ZKV(None, max_context=4096+64+64, ssd_cache="off")
N=14
text = bench_tokens(m.tokenizer, 4096 + 32*N)
prefix = text[:4096]
sufs = [text[4096+32*i:4096+32*(i+1)] for i in range(N)]
ttft(m, text[:64])
print("miss", ttft(m, prefix+sufs[0]), flush=True)
eng = m._thread
for i in range(1,4):
    print("hit", ttft(m, prefix+sufs[i]), flush=True)
print("pool", [a.shape for a in m._thread.engine.runner.pool.k[:1]] if hasattr(m._thread,'engine') else None)
orig_attend = PG.attend
orig_write = KP.KVPool.write
acc = {}
def add(k, v): acc[k] = acc.get(k, 0.0) + v
def timed_attend(q, layer, meta, scale, **kw):
    t=time.perf_counter(); mx.eval(q); t1=time.perf_counter()
    out = orig_attend(q, layer, meta, scale, **kw); mx.eval(out); t2=time.perf_counter()
    add("pre", t1-t); add("attn", t2-t1); return out
def timed_write(self, layer, k, v, plan):
    t=time.perf_counter(); mx.eval(k, v); t1=time.perf_counter()
    orig_write(self, layer, k, v, plan); mx.eval(self.k[layer], self.v[layer]); t2=time.perf_counter()
    add("to_write", t1-t); add("write", t2-t1)
i=4
for mode in ("plain", "attn", "write", "plain", "attn", "write", "plain", "attn", "write"):
    acc.clear()
    PG.attend = timed_attend if mode in ("attn",) else orig_attend
    KP.KVPool.write = timed_write if mode == "write" else orig_write
    h = ttft(m, prefix+sufs[i]); i+=1
    print(mode, round(h[0],4), {k: round(v,4) for k,v in acc.items()}, flush=True)
PG.attend = orig_attend; KP.KVPool.write = orig_write
m.close()
