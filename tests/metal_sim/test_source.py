"""The simulator compiles exactly the source MLX 0.32 generates: compared byte for byte with the source MLX
itself prints (`verbose=True`) while tracing the call inside `mx.export_function`, which works without Metal."""

import re

import mlx.core as mx
import pytest

from zkv_mlx.kernels import metal, registry
from zkv_mlx.kernels.kv_format import ChannelKeyPool, quantize_pool

from . import fake_metal_kernel, sim_options, verbose_text

_BLOCK = re.compile(r"Generated source code for `[^`]*`:\n```\n.*?\n```\n", re.S)


def _verbose(factory):
    def make(**kw):
        kernel = factory(**kw)
        return lambda **call: kernel(**call, verbose=True)
    return make


def mlx_printed(fn, args, capfd, tmp_path, monkeypatch) -> list[str]:
    """Source blocks MLX prints while tracing fn(*args) for export."""
    monkeypatch.setattr(mx.fast, "metal_kernel", _verbose(mx.fast.metal_kernel))
    registry.clear()
    capfd.readouterr()
    mx.export_function(str(tmp_path / "f.mlxfn"), fn, *args)
    printed = _BLOCK.findall(capfd.readouterr().out)
    monkeypatch.undo()
    registry.clear()
    return printed


def ours(fn, args, monkeypatch) -> list[str]:
    monkeypatch.setattr(mx.fast, "metal_kernel", fake_metal_kernel)
    registry.clear()
    with sim_options(collect=[]) as opts:
        fn(*args)
    monkeypatch.undo()
    registry.clear()
    return [verbose_text(name, k.source) for name, k in opts.collect]


def check_same(fn, args, capfd, tmp_path, monkeypatch, expect: int):
    theirs = mlx_printed(fn, args, capfd, tmp_path, monkeypatch)
    mine = ours(fn, args, monkeypatch)
    assert len(theirs) == expect
    assert mine == theirs


def _pools(dtype, k_fmt, v_fmt, nb=12, h_kv=2, bs=16, d=128):
    k = mx.random.normal((nb, h_kv, bs, d)).astype(dtype)
    v = mx.random.normal((nb, h_kv, bs, d)).astype(dtype)
    k = quantize_pool(k, *k_fmt) if k_fmt else k
    v = quantize_pool(v, *v_fmt) if v_fmt else v
    return k, v


@pytest.mark.parametrize("dtype,k_fmt,v_fmt,batch,two_pass", [
    (mx.float16, None, None, 3, False),
    (mx.bfloat16, (4, 64), (8, 32), 2, True),
    (mx.float32, (8, 64), None, 1, True),   # 1 x 3 block table: a `constant` pointer
])
def test_paged_kernels_source_matches_mlx(dtype, k_fmt, v_fmt, batch, two_pass, capfd, tmp_path, monkeypatch):
    k, v = _pools(dtype, k_fmt, v_fmt)
    flat_k = list(k) if isinstance(k, tuple) else [k]
    flat_v = list(v) if isinstance(v, tuple) else [v]
    q = mx.random.normal((batch, 4, 1, 128)).astype(dtype)
    tables = mx.arange(batch * 3, dtype=mx.int32).reshape(batch, 3)
    lens = mx.array([40] * batch, dtype=mx.int32)

    def fn(q, tables, lens, *pools):
        kk = type(k)(*pools[:len(flat_k)]) if isinstance(k, tuple) else pools[0]
        vv = type(v)(*pools[len(flat_k):]) if isinstance(v, tuple) else pools[len(flat_k)]
        return metal.paged_attention_metal(q, kk, vv, tables, lens, 0.1, max_len=40, two_pass=two_pass)

    check_same(fn, [q, tables, lens, *flat_k, *flat_v], capfd, tmp_path, monkeypatch, expect=2 if two_pass else 1)


@pytest.mark.parametrize("two_pass,return_mass,sinks", [(False, True, 4), (True, True, 0), (True, False, 2),
                                                        (False, False, 4)])
def test_mass_and_channel_key_kernels_source_matches_mlx(two_pass, return_mass, sinks, capfd, tmp_path,
                                                         monkeypatch):
    # per-channel keys (ChannelKeyPool) and the attention-mass kernels: three outputs, 13 inputs
    nb, h_kv, bs, d, batch = 6, 2, 32, 128, 2
    packed = mx.zeros((nb, h_kv, bs, d // 8), dtype=mx.uint32)
    scales = mx.ones((nb, h_kv, 1, d), dtype=mx.float16)
    tail = mx.zeros((4, h_kv, bs, d), dtype=mx.float16)
    sink = mx.zeros((4, h_kv, sinks, d), dtype=mx.float16) if sinks else mx.zeros((1,), dtype=mx.float16)
    slots = mx.full((nb, 2), -1, dtype=mx.int32)
    _, v = _pools(mx.float16, None, (4, 64), nb=nb, bs=bs)
    q = mx.random.normal((batch, 4, 1, d)).astype(mx.float16)
    tables = mx.arange(batch * 3, dtype=mx.int32).reshape(batch, 3)
    lens = mx.array([70] * batch, dtype=mx.int32)

    def fn(q, tables, lens, packed, scales, tail, sink, slots, *vv):
        k = ChannelKeyPool(packed, scales, scales, tail, sink, slots, sinks)
        out = metal.paged_attention_metal(q, k, type(v)(*vv), tables, lens, 0.1, max_len=70, two_pass=two_pass,
                                          return_mass=return_mass)
        return list(out) if return_mass else out

    check_same(fn, [q, tables, lens, packed, scales, tail, sink, slots, *v], capfd, tmp_path, monkeypatch,
               expect=1 + two_pass + return_mass)


SOURCES = {
    # template args of every kind, a 0-d input, a small (constant) input, atomic output
    "tmpl": dict(input_names=["a", "c", "s"], output_names=["out"], atomic_outputs=True,
                 source="uint i = thread_position_in_grid.x; // a_ndim\n"
                        "atomic_fetch_add_explicit(&out[0], T(a[i] * c[0] * s), memory_order_relaxed);"),
    # shapes/strides and two outputs with an attribute
    "multi": dict(input_names=["a"], output_names=["x", "y"], atomic_outputs=False,
                  source="uint i = threadgroup_position_in_grid.x; x[i] = a[i] * a_shape[0]; y[i] = a_strides[0];"),
    # MLX 0.32's broken parameter list: two outputs, shape used, no attribute
    "broken": dict(input_names=["a"], output_names=["x", "y"], atomic_outputs=False,
                   source="x[0] = a_shape[0]; y[0] = 1;"),
}


@pytest.mark.parametrize("case", sorted(SOURCES))
def test_handwritten_kernels_source_matches_mlx(case, capfd, tmp_path, monkeypatch):
    spec = SOURCES[case]

    def fn(a, c):
        kernel = registry_free_kernel(spec)
        return kernel(inputs=[a, c, 2.5][:len(spec["input_names"])], output_shapes=[(4,)] * len(spec["output_names"]),
                      output_dtypes=[mx.float32] * len(spec["output_names"]), grid=(8, 1, 1), threadgroup=(4, 1, 1),
                      template=[("T", mx.float32), ("N", 3), ("B", True)] if case == "tmpl" else None)

    def registry_free_kernel(spec):
        return mx.fast.metal_kernel(name=f"t_{case}", header="// header\n", **spec)

    a, c = mx.ones((16,)), mx.ones((2,), dtype=mx.float16)
    check_same(fn, [a, c], capfd, tmp_path, monkeypatch, expect=1)
