"""One decode step of the bundled model (mlx-lm's own KVCache) cut into pieces with mx.eval between them.

Not a shipped command (issue #20 item 1's profile). Per piece the summed ms of one step (all 30 layers), median
of 7 steps after a warm-up: embed, norms, q/k/v projections, rope, K/V write, attention, o projection,
gate/up projections, silu * up, down projection, head, sampling (logsumexp + argmax as generate_step).
The eval boundaries cost a little each (~30 syncs per piece kind): the total is above an unprofiled step.
zkv's step is the same model code except the K/V write and the attention (`profile_decode_step.py`).

    .venv/bin/python docs/experiments/profile_step_pieces.py 4096
"""
import zkv_mlx, time, statistics, sys
import mlx.core as mx, mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache
from zkv_mlx.models.loader import load_model
lm = load_model(None, "float32"); model = lm.model
inner = model.model
cache = make_prompt_cache(model)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 16
for c in cache:
    c.update_and_fetch(mx.random.normal((1,3,N-1,64)), mx.random.normal((1,3,N-1,64)))
mx.eval([c.state for c in cache])
acc = {}
def tick(name, t0, *arrs):
    mx.eval(*arrs); t = time.perf_counter(); acc.setdefault(name, []).append(t - t0); return t
tot=[]
for r in range(8):
    acc_r = {}
    T0 = t0 = time.perf_counter()
    h = inner.embed_tokens(mx.array([[1]])); t0 = tick("embed", t0, h)
    for layer, c in zip(inner.layers, cache):
        a = layer.self_attn
        x = layer.input_layernorm(h); t0 = tick("norm", t0, x)
        q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x); t0 = tick("qkv_proj", t0, q, k, v)
        q = q.reshape(1, 1, a.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(1, 1, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(1, 1, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = a.rope(q, offset=c.offset); k = a.rope(k, offset=c.offset); t0 = tick("rope", t0, q, k)
        kk, vv = c.update_and_fetch(k, v); t0 = tick("kv_write", t0, kk, vv)
        o = mx.fast.scaled_dot_product_attention(q, kk, vv, scale=a.scale); t0 = tick("attention", t0, o)
        c.offset -= 1
        o = a.o_proj(o.transpose(0, 2, 1, 3).reshape(1, 1, -1)); t0 = tick("o_proj", t0, o)
        h = h + o
        x = layer.post_attention_layernorm(h); t0 = tick("norm", t0, x)
        m = layer.mlp
        g, u = m.gate_proj(x), m.up_proj(x); t0 = tick("gate_up_proj", t0, g, u)
        z = nn.silu(g) * u; t0 = tick("silu_mul", t0, z)
        d = m.down_proj(z); t0 = tick("down_proj", t0, d)
        h = h + d
    h = inner.norm(h); t0 = tick("norm", t0, h)
    logits = inner.embed_tokens.as_linear(h); t0 = tick("head", t0, logits)
    tok = mx.argmax(logits - mx.logsumexp(logits, keepdims=True), axis=-1); t0 = tick("sample", t0, tok)
    tot.append(t0 - T0)
# per-round sums, median over rounds (first dropped)
rounds = 8
res = {}
for k, v in acc.items():
    per = len(v) // rounds
    sums = [sum(v[i*per:(i+1)*per]) for i in range(rounds)][1:]
    res[k] = round(statistics.median(sums)*1e3, 2)
print("context", N, "total_ms", round(statistics.median(tot[1:])*1e3,1), res)
