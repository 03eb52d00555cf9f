"""Export and import of whole blocks' stored bytes, all layers at once (the SSD tier and session files).

`BlockBytes` is the part of `KVPool` that turns blocks into numpy arrays and back (same pool format only).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class BlockBytes:
    """Block export/import of a `KVPool` (mixed into `KVPool`; uses its arrays and slabs)."""

    @property
    def sink_section_bytes(self) -> int:
        """Bytes at the end of each exported K row holding the sink flag and sink keys (0 without sinks)."""
        if self.quant is None or not self.quant.sinks:
            return 0
        return 4 + self.n_kv_heads * self.quant.sinks * self.head_dim * self.dtype.size

    def block_layout(self) -> tuple[tuple[tuple[int, ...], str], tuple[tuple[int, ...], str]]:
        """Shape and numpy dtype name of one block's exported K and of its V, per layer (as `export_blocks`
        gives them without the block axis).

        Returns:
            ((k_shape, k_dtype), (v_shape, v_dtype)). Float pools: (H, BS, D) in the pool dtype (bfloat16 as
            "uint16") for both; quantized pools: ((k_bytes,), "uint8"), ((v_bytes,), "uint8"), where K and V
            differ whenever their bits or layouts differ (int4 with per-channel keys, k8v4).
        """
        if self.quant is None:
            name = "uint16" if self.dtype == mx.bfloat16 else str(self.dtype).split(".")[-1]
            shape = (self.n_kv_heads, self.block_size, self.head_dim)
            return (shape, name), (shape, name)

        def nbytes(arrays) -> int:
            return sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.size for a in arrays)

        k = nbytes(self.k[0]) + self.sink_section_bytes
        return ((k,), "uint8"), ((nbytes(self.v[0]),), "uint8")

    def export_blocks(self, block_ids: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Stored bytes of full blocks, per layer: K and V numpy arrays with the block axis first.

        Float pools: [n, H, BS, D] (bfloat16 as raw uint16). Quantized pools: uint8 [n, bytes] (packed, scales
        and biases of each block concatenated). `import_blocks` is the inverse for a pool of the same format.
        """
        idx = mx.array(block_ids, dtype=mx.int32)
        ks, vs = [], []
        for layer in range(self.n_layers):
            for src, dst in ((self.k[layer], ks), (self.v[layer], vs)):
                if self.quant is None:
                    a = src[idx]
                    if a.dtype == mx.bfloat16:
                        a = a.view(mx.uint16)
                    dst.append(np.array(a))
                else:
                    parts = [_bytes(a[idx], len(block_ids)) for a in src]
                    if src is self.k[layer] and self.quant.sinks:
                        parts += self._export_sinks(layer, block_ids)
                    dst.append(np.concatenate(parts, axis=1))
        return ks, vs

    def _export_sinks(self, layer: int, block_ids: list[int]) -> list[np.ndarray]:
        # per block: a uint32 flag (1 = first block with sink keys) and the sink keys in `dtype`
        shape = (self.n_kv_heads, self.quant.sinks, self.head_dim)
        rows = [self.sink_k[layer][self._sink_slot[b]] if b in self._sink_slot else mx.zeros(shape, self.dtype)
                for b in block_ids]
        flags = mx.array([int(b in self._sink_slot) for b in block_ids], dtype=mx.uint32)
        return [_bytes(flags, len(block_ids)), _bytes(mx.stack(rows), len(block_ids))]

    def import_blocks(self, block_ids: list[int], ks: list[np.ndarray], vs: list[np.ndarray]) -> None:
        """Writes blocks exported by `export_blocks` (same format) into the given block ids."""
        if self.quant is None and self.dtype != mx.bfloat16 and self._write_in_place(block_ids, ks, vs):
            return
        idx = mx.array(block_ids, dtype=mx.int32)
        n = len(block_ids)
        for layer in range(self.n_layers):
            for dst, data in ((self.k[layer], ks[layer]), (self.v[layer], vs[layer])):
                if self.quant is None:
                    a = mx.array(data)
                    if self.dtype == mx.bfloat16:
                        a = a.view(mx.bfloat16)
                    dst[idx] = a.astype(self.dtype)
                    continue
                data = np.ascontiguousarray(data).reshape(n, -1)
                at = 0
                for i, a in enumerate(dst):
                    dst[i][idx] = _from_bytes(data, at, n, a.dtype, a.shape[1:])
                    at += a[0].nbytes
                for b in block_ids:
                    self.drop_tail(b)
                if dst is self.k[layer] and self.quant.sinks:
                    flags = np.array(_from_bytes(data, at, n, mx.uint32, ()))
                    shape = (self.n_kv_heads, self.quant.sinks, self.head_dim)
                    rows = _from_bytes(data, at + 4, n, self.dtype, shape)
                    for i, b in enumerate(block_ids):
                        if layer == 0:
                            self._drop_sink(b)
                            if flags[i]:
                                self._sink_slot[b] = self._take_sink()
                        if flags[i]:
                            self.sink_k[layer][self._sink_slot[b]] = rows[i]
        self._slot_map = None
        mx.eval(self.k, self.v)

    def _write_in_place(self, block_ids: list[int], ks: list[np.ndarray], vs: list[np.ndarray]) -> bool:
        """Float16/32 pools: copies the blocks straight into the pool arrays' memory (one memcpy per run of
        consecutive block ids) instead of building an MLX array and scattering it (two more copies).

        The blocks are free ones the caller just took (no sequence reads them, no queued op writes them), and the
        pool arrays are evaluated first, so MLX sees the bytes as if a scatter had written them. Returns False
        (nothing written) when an array is not one dense buffer numpy can write, e.g. a broadcast constant.
        """
        mx.eval(self.k, self.v)
        views = []
        for layer in range(self.n_layers):
            for dst, data in ((self.k[layer], ks[layer]), (self.v[layer], vs[layer])):
                view = np.asarray(dst)  # shares dst's buffer (dst is evaluated)
                if not (view.flags.c_contiguous and view.flags.writeable) or view.dtype != data.dtype:
                    return False
                views.append((view, data))
        runs, start = [], 0
        for i in range(1, len(block_ids) + 1):
            if i == len(block_ids) or block_ids[i] != block_ids[i - 1] + 1:
                runs.append((block_ids[start], start, i))
                start = i
        for view, data in views:
            for first, a, b in runs:
                view[first:first + b - a] = data[a:b]
        return True


def _bytes(a: mx.array, n: int) -> np.ndarray:
    # [n, ...] -> uint8 [n, bytes] (bfloat16 through its raw bits)
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a).reshape(n, -1)).view(np.uint8)


def _from_bytes(data: np.ndarray, at: int, n: int, dtype: mx.Dtype, shape: tuple) -> mx.array:
    per = int(np.prod(shape, dtype=np.int64)) * dtype.size
    a = mx.array(data[:, at:at + per].copy().view(_np_dtype(dtype)).reshape(n, *shape))
    return a.view(mx.bfloat16) if dtype == mx.bfloat16 else a


def _np_dtype(dtype: mx.Dtype):
    return {mx.uint32: np.uint32, mx.uint8: np.uint8, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.float32: np.float32}[dtype]
