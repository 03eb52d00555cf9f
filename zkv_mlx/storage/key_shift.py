"""Re-rotating stored keys of whole blocks (long-context policies, engine/drop.py), for every KV format.

RoPE is a rotation by position, so moving a block's keys `delta` positions is one more rotation. A quantized
block cannot be rotated in its packed form: its keys are dequantized, rotated in float32 and quantized again
(per token, or per channel over the block with its sink rows kept apart, storage/channel_keys.py). The
full-precision rows beside a per-channel block (its sink and tail slab rows) are rotated in place. Each shift
re-quantizes once: `zkv-mlx eval ppl --kv-quant int4 --kv-policy window` measures what that costs.

A policy's sink block (a first block, with sink-slab rows) is shifted at every drop of the window policy: ~110
times over a 4096-token window at budget 512 and block 32. Re-quantizing its own dequantized keys each time adds a
fresh rounding error every time, so such a block keeps a float32 "master" of its keys (dequantized once, then only
rotated in float) and each shift quantizes the rotated master: two roundings in all, however often it moves.
The master is forgotten with the block's sink slot (the block is reused or overwritten: channel_keys._drop_sink).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from ..kernels.kv_quant import dequantize_channels, dequantize_tokens, quantize_tokens
from .write_plan import scatter

# rotate(layer, keys [n, H, BS, D] float32) -> the same keys turned `delta` more positions
Rotate = Callable[[int, mx.array], mx.array]


def shift_block_keys(pool, block_ids: list[int], rotate: Rotate) -> None:
    """Rotates the keys of whole blocks of a `KVPool` (every layer) with `rotate`.

    Args:
        pool: the KVPool (float or quantized).
        block_ids: blocks whose keys move (each at most once).
        rotate: per layer, the rotation of [n, H, BS, D] float32 keys.
    """
    idx = mx.array(block_ids, dtype=mx.int32)
    q = pool.quant
    for layer in range(pool.n_layers):
        if q is None:
            k = rotate(layer, pool.k[layer][idx].astype(mx.float32))
            pool.k[layer][idx] = k.astype(pool.dtype)
        elif not q.k_channel:
            pk, sk, bk = pool.k[layer]
            k = rotate(layer, dequantize_tokens(pk[idx], sk[idx], bk[idx], q.k_bits, q.group_size))
            scatter(pool.k[layer], (idx,), quantize_tokens(k, q.k_bits, q.group_size))
        else:
            _shift_channel_keys(pool, layer, block_ids, idx, rotate)


def _shift_channel_keys(pool, layer: int, block_ids: list[int], idx: mx.array, rotate: Rotate) -> None:
    q = pool.quant
    full = [b for b in block_ids if b not in pool._slot]  # partial blocks live in the tail slab only
    if full:
        fidx = mx.array(full, dtype=mx.int32)
        pk, sk, bk = pool.k[layer]
        k = dequantize_channels(pk[fidx], sk[fidx], bk[fidx], q.k_bits)  # [n, H, BS, D]
        masters = pool._key_master
        kept = [i for i, b in enumerate(full) if b in pool._sink_slot]
        if kept:  # sink blocks: rotate the float master, not the last re-quantization
            rows = [m[layer] if (m := masters.get(full[i])) and m[layer] is not None else k[i] for i in kept]
            k[mx.array(kept, dtype=mx.int32)] = mx.stack(rows)
        k = rotate(layer, k)
        rows = [k[i] for i in kept]
        mx.eval(rows)  # no graph chain from one move to the next
        for i, r in zip(kept, rows):
            masters.setdefault(full[i], [None] * pool.n_layers)[layer] = r
        scatter(pool.k[layer], (fidx,), pool._quantize_keys(k, [b in pool._sink_slot for b in full]))
    tails = [pool._slot[b] for b in block_ids if b in pool._slot]
    if tails:
        t = mx.array(tails, dtype=mx.int32)
        pool.tail_k[layer][t] = rotate(layer, pool.tail_k[layer][t].astype(mx.float32)).astype(pool.dtype)
    sinks = [pool._sink_slot[b] for b in block_ids if b in pool._sink_slot]
    if sinks:
        s = mx.array(sinks, dtype=mx.int32)
        pool.sink_k[layer][s] = rotate(layer, pool.sink_k[layer][s].astype(mx.float32)).astype(pool.dtype)
