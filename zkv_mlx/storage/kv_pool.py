"""The paged KV pool: per layer one K and one V array shaped [num_blocks, n_kv_heads, block_size, head_dim].

Writes are MLX scatters (indexed assignment), which MLX performs in place when the pool array has no other
reference (design.md §2): this object holds the only long-lived reference to each array.
"""

from __future__ import annotations

import mlx.core as mx


class KVPool:
    """Per-layer K/V block arrays.

    Args:
        n_layers, num_blocks, n_kv_heads, block_size, head_dim: pool geometry.
        dtype: storage dtype (float16, bfloat16 or float32).
    """

    def __init__(self, n_layers: int, num_blocks: int, n_kv_heads: int, block_size: int, head_dim: int,
                 dtype: mx.Dtype):
        self.n_layers = n_layers
        self.num_blocks = num_blocks
        self.n_kv_heads = n_kv_heads
        self.block_size = block_size
        self.head_dim = head_dim
        self.dtype = dtype
        shape = (num_blocks, n_kv_heads, block_size, head_dim)
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        mx.eval(self.k, self.v)
        # [1, H]: broadcast against [N, 1] block/offset indices to address every head of a row.
        self._heads = mx.arange(n_kv_heads)[None, :]

    @staticmethod
    def bytes_per_block(n_layers: int, n_kv_heads: int, block_size: int, head_dim: int, dtype: mx.Dtype) -> int:
        """Bytes of K and V for one block across all layers."""
        return 2 * n_layers * n_kv_heads * block_size * head_dim * dtype.size

    @property
    def total_bytes(self) -> int:
        """Bytes held by the pool arrays."""
        return self.bytes_per_block(self.n_layers, self.n_kv_heads, self.block_size, self.head_dim,
                                    self.dtype) * self.num_blocks

    def write(self, layer: int, keys: mx.array, values: mx.array, blocks: mx.array, offsets: mx.array) -> None:
        """Stores new rows.

        Args:
            keys, values: [N, n_kv_heads, head_dim] rows for N token positions.
            blocks, offsets: [N] int32 block id and in-block offset of each position.
        """
        b = blocks[:, None]
        o = offsets[:, None]
        self.k[layer][b, self._heads, o] = keys.astype(self.dtype)
        self.v[layer][b, self._heads, o] = values.astype(self.dtype)

    def gather(self, layer: int, block_table: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """Returns one sequence's first `length` K/V rows as [1, n_kv_heads, length, head_dim] each."""
        return (_contiguous(self.k[layer], block_table, length), _contiguous(self.v[layer], block_table, length))

    def read_blocks(self, block_ids: list[int]) -> list[tuple[mx.array, mx.array]]:
        """Copies of the given blocks for every layer (for tests and, later, spilling to SSD)."""
        idx = mx.array(block_ids, dtype=mx.int32)
        return [(self.k[i][idx], self.v[i][idx]) for i in range(self.n_layers)]


def _contiguous(pool: mx.array, block_table: mx.array, length: int) -> mx.array:
    # pool[block_table]: [nb, H, BS, D] -> [H, nb*BS, D] -> first `length` rows, batch axis added.
    nb, h, bs, d = block_table.shape[0], pool.shape[1], pool.shape[2], pool.shape[3]
    x = pool[block_table].transpose(1, 0, 2, 3).reshape(h, nb * bs, d)
    return x[None, :, :length, :]
