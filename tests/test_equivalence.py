"""The engine computes what mlx-lm computes: same greedy tokens, close logits; batched == alone."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from zkv_mlx.config import make_config
from zkv_mlx.engine import Engine, SamplingParams
from zkv_mlx.models.loader import load_model

PROMPTS = [
    "The quick brown fox",
    "Paged attention stores keys and values in fixed-size blocks so that",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18",
    "Once upon a time, in a land far away, there lived a",
]


def run_engine(engine: Engine, prompts_ids, max_tokens, params=None):
    """Runs requests to completion on this thread; returns the token ids of each (params: one SamplingParams
    per prompt, default greedy)."""
    outs = {}
    seqs = []
    for i, ids in enumerate(prompts_ids):
        p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True) if params is None else params[i]
        def listener(ev, i=i):
            if ev.kind == "error":
                raise ev.error
            if ev.token_id is not None:
                outs.setdefault(i, []).append(ev.token_id)
        seqs.append(engine.add_request(ids, p, "local", listener))
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def mlx_lm_greedy(model, ids, n):
    return [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]


def make_engine(spec, **kw):
    cfg = make_config(model=spec, kv_cache_memory="64MB", **kw)
    return Engine(load_model(spec, cfg.weights_dtype), cfg)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_mlx_lm(family, tiny_model_dir, bundled_tokenizer):
    path = str(tiny_model_dir(family))
    engine = make_engine(path, block_size=8, prefill_chunk=16)  # small chunks: prefill spans several steps
    ref = load_model(path).model
    ids = [bundled_tokenizer.encode(p) for p in PROMPTS]
    got = run_engine(engine, ids, 32)
    for prompt_ids, out in zip(ids, got):
        assert out == mlx_lm_greedy(ref, prompt_ids, 32)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_logits_allclose(family, tiny_model_dir, bundled_tokenizer):
    path = str(tiny_model_dir(family))
    engine = make_engine(path, block_size=8)
    ref = load_model(path).model
    ids = bundled_tokenizer.encode(PROMPTS[1])
    # reference logits for every position, one forward pass
    cache = make_prompt_cache(ref)
    want = ref(mx.array(ids)[None], cache=cache)[0]
    seq = engine.add_request(ids[:5], SamplingParams(max_tokens=1, temperature=0.0), "local", lambda ev: None)
    engine.scheduler.schedule()  # allocates blocks
    runner = engine.runner
    got = runner.prefill(seq, 0, 5)
    assert mx.allclose(got, want[4], atol=1e-4, rtol=1e-4).item()
    # decode the remaining positions one at a time through the paged decode path
    seq.num_computed = 5
    for pos in range(5, len(ids)):
        seq.prompt_ids = ids[: pos + 1]
        engine.blocks.may_append(seq, 0)
        got = runner.decode([seq])[0]
        assert mx.allclose(got, want[pos], atol=1e-4, rtol=1e-4).item(), pos
        seq.num_computed += 1


def test_batch_equals_alone(tiny_model_dir, bundled_tokenizer):
    path = str(tiny_model_dir("llama"))
    engine = make_engine(path, block_size=8)
    ids = [bundled_tokenizer.encode(p) for p in PROMPTS]
    together = run_engine(engine, ids, 24)
    alone = [run_engine(engine, [x], 24)[0] for x in ids]
    assert together == alone
    assert engine.blocks.num_used_blocks == 0


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_sampled_batch_equals_alone(tiny_model_dir, bundled_tokenizer, penalty):
    # One sampling graph for the batch (per-row parameters as arrays): each seeded request gets the tokens it
    # gets alone, greedy rows mixed in; penalty 1.3 on one request takes the non-pipelined path.
    path = str(tiny_model_dir("llama"))
    engine = make_engine(path, block_size=8)
    ids = [bundled_tokenizer.encode(p) for p in PROMPTS]
    kw = dict(max_tokens=20, ignore_eos=True)
    params = [SamplingParams(temperature=0.9, seed=1, **kw), SamplingParams(temperature=0.0, **kw),
              SamplingParams(temperature=1.2, top_k=8, top_p=0.9, seed=2, repetition_penalty=penalty, **kw),
              SamplingParams(temperature=0.7, min_p=0.05, seed=3, **kw)]
    together = run_engine(engine, ids, 20, params)
    alone = [run_engine(engine, [x], 20, [p])[0] for x, p in zip(ids, params)]
    assert together == alone
    assert len({tuple(t) for t in together}) == len(together)  # distinct streams, not one repeated


def test_pipelined_penalty_equals_resolved_steps(tiny_model_dir, bundled_tokenizer):
    # With a repetition penalty the decode stays pipelined: the in-flight token counts as the history's newest.
    # Resolving after every step (nothing in flight when the next step samples) must give the same tokens.
    path = str(tiny_model_dir("llama"))
    engine = make_engine(path, block_size=8)
    ids = [bundled_tokenizer.encode(p) for p in PROMPTS[:3]]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, temperature=t, seed=5, repetition_penalty=rp,
                             repetition_context=ctx)
              for t, rp, ctx in ((0.0, 1.8, 4), (0.9, 1.5, 64), (0.0, 1.0, 64))]
    piped = run_engine(engine, ids, 24, params)
    step = engine.step
    engine.step = lambda: step() + engine._resolve()
    resolved = run_engine(engine, ids, 24, params)
    assert piped == resolved
    unpenalized = run_engine(make_engine(path, block_size=8), ids[:1], 24, [SamplingParams(max_tokens=24,
                                                                                         ignore_eos=True,
                                                                                         temperature=0.0)])
    assert piped[0] != unpenalized[0]  # the penalty changed what greedy picks


@pytest.mark.slow
def test_bundled_model_matches_mlx_lm(bundled_tokenizer):
    engine = make_engine(None)
    ref = load_model(None).model
    msgs = [[{"role": "user", "content": p}] for p in ("What is the capital of France?", "Count to five.")]
    ids = [bundled_tokenizer.encode_chat(m) for m in msgs]
    got = run_engine(engine, ids, 32)
    for prompt_ids, out in zip(ids, got):
        assert out == mlx_lm_greedy(ref, prompt_ids, 32)
    # and logits of the first generated position agree
    cache = make_prompt_cache(ref)
    want = ref(mx.array(ids[0])[None], cache=cache)[0, -1]
    seq = engine.add_request(ids[0], SamplingParams(max_tokens=1, temperature=0.0), "local", lambda ev: None)
    engine.scheduler.schedule()
    got_logits = engine.runner.prefill(seq, 0, len(ids[0]))
    assert mx.allclose(got_logits, want, atol=2e-3, rtol=1e-3).item()
    engine.scheduler.finish(seq, "stop")


def test_preemption_recompute_gives_same_tokens(tiny_model_dir, bundled_tokenizer):
    # A pool so small that 4 sequences cannot all grow: the newest get preempted and recomputed.
    path = str(tiny_model_dir("llama"))
    cfg = make_config(model=path, block_size=8)
    lm = load_model(path)
    from zkv_mlx.storage.kv_pool import KVPool
    per_block = KVPool.bytes_per_block(lm.n_layers, lm.n_kv_heads, 8, lm.head_dim, lm.dtype)
    cfg = make_config(model=path, block_size=8, kv_cache_memory=per_block * 12)
    engine = Engine(lm, cfg)
    ids = [bundled_tokenizer.encode(p) for p in PROMPTS]
    together = run_engine(engine, ids, 24)
    assert engine.scheduler.num_preemptions > 0
    big = make_engine(path, block_size=8)
    alone = [run_engine(big, [x], 24)[0] for x in ids]
    assert together == alone


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_grouped_decode_attention_matches_single_and_is_batch_invariant(dtype):
    """The batched CPU decode path (short contexts) equals the per-sequence path within rounding, and a
    sequence's output is bitwise the same alone as in a group (whatever the other members)."""
    from zkv_mlx.kernels.reference import grouped_decode_attention, single_decode_attention

    mx.random.seed(3)
    nb_pool, h, bs, d, heads = 40, 2, 8, 32, 4
    kp = mx.random.normal((nb_pool, h, bs, d)).astype(dtype)
    vp = mx.random.normal((nb_pool, h, bs, d)).astype(dtype)
    q = mx.random.normal((3, heads, 1, d)).astype(dtype)
    tables = [[5, 6, 7, 1], [30, 2, 9, 11], [12, 13, 14, 15]]  # 4 blocks each, scattered ids
    lens = [25, 32, 29]  # all in (3 * 8, 4 * 8]
    group = grouped_decode_attention(q, kp, vp, mx.array(tables), mx.array(lens), 0.25)
    for i in range(3):
        alone = grouped_decode_attention(q[i:i + 1], kp, vp, mx.array(tables[i:i + 1]), mx.array(lens[i:i + 1]), 0.25)
        assert mx.array_equal(alone, group[i:i + 1]).item()
        single = single_decode_attention(q[i:i + 1], kp, vp, tables[i], lens[i], 0.25)
        tol = 1e-5 if dtype == mx.float32 else 2e-3
        assert mx.allclose(single, alone, atol=tol, rtol=tol).item()
