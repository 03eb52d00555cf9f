"""Numeric edges of sampling (issue 17 §3): every parameter extreme gets its limit or a typed error.

The sampler functions are tested directly over hypothesis-generated parameters and logits (cheap); a few
end-to-end calls on a tiny model check that the API raises typed errors and that tiny temperatures are greedy.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zkv_mlx import ZKV
from zkv_mlx.engine.sampler import GREEDY_BELOW, NO_TOKEN, sample, sample_lazy
from zkv_mlx.engine.sequence import SamplingParams, Sequence
from zkv_mlx.errors import ConfigError, SamplingError

V = 37  # vocab of the synthetic logits
F32_MAX = float(np.finfo(np.float32).max)
PROFILE = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

finite = st.floats(-F32_MAX, F32_MAX, width=32)
special = st.sampled_from([math.nan, -math.inf, math.inf])


@st.composite
def logit_rows(draw, allow_posinf: bool = True):
    """[V] float32 logits: any finite values plus some NaN / -inf (/ +inf), with at least one valid entry."""
    vals = draw(st.lists(st.one_of(finite, finite, special), min_size=V, max_size=V))
    if not allow_posinf:
        vals = [-math.inf if v == math.inf else v for v in vals]
    if all(math.isnan(v) or v == -math.inf for v in vals):
        vals[draw(st.integers(0, V - 1))] = draw(finite)
    return vals


params_st = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 100.0), st.floats(1e-45, 1e-3),
                          st.sampled_from([5e-324, 1e-45, 1e-38, GREEDY_BELOW, 100.0])),
    top_p=st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([5e-324, 1e-45, 1.0])),
    top_k=st.one_of(st.integers(0, V + 2), st.sampled_from([1, 10**30])),
    min_p=st.one_of(st.floats(0.0, 1.0, exclude_max=True), st.sampled_from([0.0, 1e-45, 1 - 1e-16])),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(0.0, 100.0, exclude_min=True),
                                 st.sampled_from([5e-324, 1e-45, 100.0])),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)


def _seq(params: SamplingParams, history=(3, 5, 7)) -> Sequence:
    return Sequence(prompt_ids=list(history), params=params)


def _valid_ids(row) -> set[int]:
    a = np.array(row, dtype=np.float32)
    if np.isposinf(a).any():
        return set(np.flatnonzero(np.isposinf(a)).tolist())
    return set(np.flatnonzero(~np.isnan(a) & (a > -np.inf)).tolist())


@PROFILE
@given(row=logit_rows(), params=params_st)
def test_any_valid_params_give_a_valid_token(row, params):
    """Every valid parameter set picks a token in range and never a NaN or -inf entry (+inf entries win)."""
    history = (0, 3, int(np.argmax(np.nan_to_num(np.array(row, np.float32), nan=-np.inf))))
    tok = sample(mx.array([row]), [_seq(params, history)])[0]
    assert 0 <= tok < V and tok in _valid_ids(row)
    if params.repetition_penalty == 1.0:
        lazy = sample_lazy(mx.array([row]), [_seq(params, history)]).tolist()[0]
        assert 0 <= lazy < V and lazy in _valid_ids(row)


@PROFILE
@given(row=logit_rows(), t=st.one_of(st.floats(0.0, GREEDY_BELOW, exclude_max=True),
                                     st.sampled_from([5e-324, 1e-45, 1e-38])), seed=st.integers(0, 2**64 - 1))
def test_tiny_temperature_is_greedy(row, t, seed):
    greedy = sample(mx.array([row]), [_seq(SamplingParams(temperature=0.0))])[0]
    p = SamplingParams(temperature=t, seed=seed, top_p=0.5, top_k=3)
    assert sample(mx.array([row]), [_seq(p)])[0] == greedy
    assert sample_lazy(mx.array([row]), [_seq(p)]).tolist()[0] == greedy


@PROFILE
@given(vals=st.lists(st.floats(-30, 30, width=32), min_size=V, max_size=V, unique=True),
       t=st.floats(GREEDY_BELOW, 1e-3), scale=st.sampled_from([1.0, 1e3, 1e30, F32_MAX / 64]),
       seed=st.integers(0, 2**32))
def test_small_temperature_converges_to_argmax(vals, t, scale, seed):
    """Above the greedy threshold, a clear winner still wins: logits / temperature never overflow to NaN."""
    a = np.array(vals, np.float32) * np.float32(scale)
    best = int(np.argmax(a))
    gap = float(a[best] - np.partition(a, -2)[-2])
    if gap / t < 200:  # not a near-tie at this temperature: then exp(-gap/t) is far below 1 / 2**32
        return
    p = SamplingParams(temperature=t, seed=seed)
    assert sample(mx.array(a[None]), [_seq(p)])[0] == best
    assert sample_lazy(mx.array(a[None]), [_seq(p)]).tolist()[0] == best


def test_realistic_logits_at_the_reported_temperatures_are_greedy():
    """The issue's input: logits of ~30 at temperature 1e-38 / 1e-45 overflowed and picked token 0 (EOS)."""
    row = np.linspace(-5, 31, V).astype(np.float32)[::-1].copy()
    row[0], row[11] = -4.0, 31.5  # token 0 (EOS) is not the winner; 11 is
    for t in (1e-38, 1e-45, 1e-20, GREEDY_BELOW):
        for fn in (lambda x, s: sample(x, s)[0], lambda x, s: sample_lazy(x, s).tolist()[0]):
            assert fn(mx.array(row[None]), [_seq(SamplingParams(temperature=t, seed=1))]) == 11


@pytest.mark.parametrize("row", [[math.nan] * V, [-math.inf] * V, [math.nan, -math.inf] * (V // 2) + [math.nan]])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=3),
                                    SamplingParams(temperature=1.0, top_p=0.9, top_k=5, min_p=0.1, seed=4),
                                    SamplingParams(temperature=0.0, repetition_penalty=1.3)])
def test_rows_without_a_finite_logit_give_no_token(row, params):
    """All-NaN / all -inf rows give NO_TOKEN (the engine turns it into an error), never token 0 (EOS)."""
    good = [0.0] * V
    good[5] = 50.0
    got = sample(mx.array([good, row]), [_seq(params), _seq(params)])
    assert got == [5, NO_TOKEN]
    if params.repetition_penalty == 1.0:
        assert sample_lazy(mx.array([good, row]), [_seq(params), _seq(params)]).tolist() == [5, NO_TOKEN]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_entries_are_never_picked_and_posinf_wins(temperature):
    row = [math.nan] * V
    row[7], row[9] = -1.0, -3.0
    for fn in (lambda x, s: sample(x, s), lambda x, s: sample_lazy(x, s).tolist()):
        for seed in range(8):
            assert fn(mx.array([row]), [_seq(SamplingParams(temperature=temperature, seed=seed))])[0] in (7, 9)
    inf_row = [1.0] * V
    inf_row[4] = inf_row[20] = math.inf
    picks = {sample(mx.array([inf_row]), [_seq(SamplingParams(temperature=temperature, seed=s))])[0]
             for s in range(16)}
    assert picks <= {4, 20} and (temperature == 0 or picks == {4, 20})  # shared among the +inf entries


@pytest.mark.parametrize("penalty", [5e-324, 1e-45, 1e-3, 100.0])
def test_repetition_penalty_extremes(penalty):
    """A 0 logit stays 0 (0 * inf is not NaN); tiny penalties push repeated positive logits to the top."""
    row = [0.0] * V
    row[1], row[2], row[3] = 5.0, 1.0, -1.0  # history: 2 and 3 (and 0, whose logit is 0)
    tok = sample(mx.array([row]), [_seq(SamplingParams(temperature=0.0, repetition_penalty=penalty), (0, 2, 3))])[0]
    if penalty < 0.2:  # 1.0 / penalty > 5: the repeated token 2 overtakes token 1
        assert tok == 2
    else:
        assert tok == 1


# -- parameter validation (API level) ---------------------------------------------------------------------------
BAD = [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1e-45), ("temperature", "0.5"),
    ("temperature", True), ("temperature", 1e300),
    ("top_p", math.nan), ("top_p", 0.0), ("top_p", -0.0), ("top_p", 1.0000001), ("top_p", math.inf),
    ("top_k", -1), ("top_k", 1.5), ("top_k", True), ("top_k", "5"),
    ("min_p", math.nan), ("min_p", 1.0), ("min_p", -1e-45),
    ("repetition_penalty", math.nan), ("repetition_penalty", 0.0), ("repetition_penalty", math.inf),
    ("repetition_penalty", 100.5), ("repetition_penalty", -1.0),
    ("seed", -1), ("seed", 2**64), ("seed", 2**70), ("seed", 1.0), ("seed", True),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.0), ("max_tokens", True), ("max_tokens", math.nan),
    ("stop", [1, 2]), ("stop", 5), ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("name, value", BAD)
def test_bad_parameters_are_config_errors_naming_value_and_range(name, value):
    with pytest.raises(ConfigError) as ei:
        SamplingParams(**{name: value})
    msg = str(ei.value)
    assert msg.startswith(f"{name}: {value!r} must be")
    assert isinstance(ei.value, ValueError)


def test_extreme_but_valid_parameters_are_accepted():
    p = SamplingParams(max_tokens=10**30, top_k=10**30, seed=2**64 - 1, temperature=5e-324, top_p=5e-324,
                       min_p=0.999999, repetition_penalty=5e-324)
    assert p.max_tokens == 10**30 and p.seed == 2**64 - 1
    assert SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.uint64(7)).top_k == 3


# -- end to end on a tiny model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    m = ZKV(str(tiny_model_dir("llama")), kv_cache_memory="16MB")
    yield m
    m.close()


PROMPT = [5, 17, 99, 3, 250, 1000]


def test_api_tiny_temperatures_equal_greedy(tiny):
    """The issue's reproduction: temperature 1e-38 / 1e-45 returned an empty reply (token 0); now greedy."""
    greedy = tiny.generate(PROMPT, temperature=0, max_tokens=6, ignore_eos=True)
    assert greedy
    for t in (1e-38, 1e-45, 5e-324):
        assert tiny.generate(PROMPT, temperature=t, max_tokens=6, ignore_eos=True, seed=1) == greedy
        assert tiny.generate(PROMPT, temperature=t, max_tokens=6, ignore_eos=True, seed=1,
                             repetition_penalty=1.0 + 1e-9) == greedy  # the eager (non-pipelined) path too
    assert tiny.chat("hi", temperature=1e-45, max_tokens=4) == tiny.chat("hi", temperature=0, max_tokens=4)


def test_api_huge_max_tokens_ends_at_the_max_context(tiny):
    events = list(tiny.submit(PROMPT, temperature=0, max_tokens=10**30, ignore_eos=True))
    done = events[-1]
    assert done.kind == "done" and done.finish_reason == "length"
    # prompt + output never exceed the max context; the pipelined decode stops one token short of it (its
    # in-flight placeholder counts), so the reply has max_context - len(prompt) - 1 tokens
    assert done.usage["completion_tokens"] == tiny.engine.max_context - len(PROMPT) - 1


@pytest.mark.parametrize("name, value", [("temperature", math.nan), ("top_p", 0.0), ("seed", -1),
                                         ("repetition_penalty", math.inf), ("max_tokens", 0), ("top_k", -3)])
def test_api_rejects_bad_parameters_before_generating(tiny, name, value):
    for call in (lambda: tiny.generate(PROMPT, **{name: value}), lambda: tiny.chat("hi", **{name: value}),
                 lambda: tiny.submit(PROMPT, **{name: value})):
        with pytest.raises(ConfigError, match=f"^{name}: "):
            call()
    s = tiny.create_session(f"bad-{name}")
    with pytest.raises(ConfigError, match=f"^{name}: "):
        s.chat("hi", **{name: value})
    assert s.messages == []  # the failed turn is not part of the conversation
    tiny.delete_session(f"bad-{name}")


@pytest.mark.parametrize("where", ["prefill", "decode"])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=2),
                                      dict(temperature=0, repetition_penalty=1.2)])
def test_api_nan_logits_from_the_model_are_a_sampling_error(tiny, monkeypatch, where, sampling):
    """A model that returns NaN logits fails the request with SamplingError (not an empty 'stop' reply), and
    the engine keeps serving."""
    runner = tiny.engine.runner
    real = getattr(runner, where)

    def broken(*args, **kwargs):
        return real(*args, **kwargs) * mx.nan

    monkeypatch.setattr(runner, where, broken)
    with pytest.raises(SamplingError, match="no finite logit"):
        tiny.generate(PROMPT, max_tokens=5, ignore_eos=True, **sampling)
    monkeypatch.undo()
    assert tiny.generate(PROMPT, max_tokens=3, ignore_eos=True, temperature=0)


# -- one sampling graph for the batch (issue #20 item 4): every row's tokens are those it gets alone -----------

seeded_params = params_st.filter(lambda p: p.seed is not None)


@PROFILE
@given(rows=st.lists(logit_rows(), min_size=2, max_size=5), data=st.data())
def test_a_batch_samples_each_row_as_alone(rows, data):
    """Mixed greedy / sampled / filtered / penalized rows: each row's tokens over three draws (its generator
    advancing) are bitwise those it gets sampled alone under the same seed."""
    params = [data.draw(seeded_params) for _ in rows]
    lazy_ok = all(p.repetition_penalty == 1.0 for p in params)
    for fn in ([sample] + ([lambda x, s: sample_lazy(x, s).tolist()] if lazy_ok else [])):
        together = [_seq(p) for p in params]
        alone = [_seq(p) for p in params]
        for _ in range(3):
            got = fn(mx.array(rows), together)
            want = [fn(mx.array([row]), [s])[0] for row, s in zip(rows, alone)]
            assert got == want


def _reference_row(row: mx.array, seq: Sequence) -> int:
    """The per-row sampler before the batch graph (mx.random.categorical on one row): seeds keep their tokens."""
    from zkv_mlx.engine.sampler import _key

    p, neg = seq.params, mx.array(-math.inf)
    if p.temperature < GREEDY_BELOW:
        return mx.argmax(row).item()
    top = row.max()
    has_inf = top == math.inf
    x = mx.where(has_inf, mx.where(row == math.inf, 0.0, -math.inf), row - mx.where(has_inf, 0.0, top)) / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        x = mx.where(x < mx.sort(x)[-p.top_k], neg, x)
    if p.min_p > 0.0:
        probs = mx.softmax(x)
        x = mx.where(probs < p.min_p * probs.max(), neg, x)
    if p.top_p < 1.0:
        order = mx.argsort(-x)
        sp = mx.softmax(x[order])
        keep_sorted = (mx.cumsum(sp) - sp) < p.top_p
        keep_sorted[0] = True
        keep = mx.zeros(x.shape, dtype=mx.bool_)
        keep[order] = keep_sorted
        x = mx.where(keep, x, neg)
    return mx.random.categorical(x, key=_key(seq)).item()


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, seed=3),
                                    SamplingParams(temperature=1.3, top_k=5, seed=11),
                                    SamplingParams(temperature=0.9, top_p=0.8, seed=2**40),
                                    SamplingParams(temperature=1.0, min_p=0.05, top_p=0.95, top_k=20, seed=7)])
def test_seeded_tokens_match_the_per_row_categorical(params):
    rng = np.random.default_rng(5)
    rows = rng.normal(0, 3, (4, 200)).astype(np.float32)
    batch = [_seq(params) for _ in rows]
    ref = [_seq(params) for _ in rows]
    for _ in range(4):
        got = sample_lazy(mx.array(rows), batch).tolist()
        assert got == [_reference_row(mx.array(r), s) for r, s in zip(rows, ref)]


@PROFILE
@given(rows=st.lists(logit_rows(), min_size=1, max_size=4), data=st.data())
def test_an_inflight_token_counts_as_the_newest_of_the_history(rows, data):
    """Pipelined decode with a repetition penalty: sampling with the newest tokens still in flight (lazy) picks
    bitwise what sampling with them already appended to the histories picks."""
    params = [data.draw(seeded_params.map(lambda p: SamplingParams(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, seed=p.seed,
        repetition_penalty=p.repetition_penalty,
        repetition_context=data.draw(st.sampled_from([0, 1, 2, 5, 64])))))
        for _ in rows]
    hist = [data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=8)) for _ in rows]
    newest = [data.draw(st.integers(0, V - 1)) for _ in rows]
    lazy = [Sequence(prompt_ids=h, params=p) for h, p in zip(hist, params)]
    known = [Sequence(prompt_ids=h + [t], params=p) for h, t, p in zip(hist, newest, params)]
    for _ in range(2):
        got = sample_lazy(mx.array(rows), lazy, mx.array(newest, dtype=mx.int32)).tolist()
        assert got == sample(mx.array(rows), known)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_penalty_window_with_a_token_in_flight(batch):
    """repetition_context 2, the newest token t in flight: the window is (last known token, t), not older ones."""
    a, b, c, t = 4, 5, 6, 7
    row = [0.0] * V
    row[t], row[a], row[c], row[b] = 10.0, 9.0, 8.0, 1.0
    p = SamplingParams(temperature=0.0, repetition_penalty=100.0, repetition_context=2)
    seqs = [Sequence(prompt_ids=[1, a, b], params=p) for _ in range(batch)]
    got = sample_lazy(mx.array([row] * batch), seqs, mx.array([t] * batch, dtype=mx.int32)).tolist()
    # t and b are penalized (10 -> 0.1, 1 -> 0.01), a is outside the window and wins
    assert got == [a] * batch
    assert sample(mx.array([row] * batch), [Sequence(prompt_ids=[1, a, b, t], params=p) for _ in range(batch)]) == got
