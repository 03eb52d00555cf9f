// Helpers for the block-walking kernels of metal/paged_attention.metal (attention-mass output, keys quantized
// per channel). Passed to mx.fast.metal_kernel after paged_common.h (header = paged_common.h + this file), so
// the source of the kernels that use paged_common.h alone does not change.
//
// These kernels give each SIMD-group whole blocks (sg takes blocks sg, sg + NSG, ...; its keys in order), so
// that one SIMD-group sees every key of a block: the per-channel scales of a block are folded into the query
// once per block, and a block's share of the softmax sum is known when the SIMD-group leaves the block.

template <bool B>
struct ZkvFlag {};

// Mass output: lane 0 writes the block's exp2 sum `bsum` relative to the SIMD-group's running max `m` after
// the block, as stats[at] = (m, bsum). The block's probability mass for this head is then
// bsum * exp2(m - M) / L with the head's final max M and sum L (paged_attention_mass).
template <typename PS>
inline void zkv_put_block_stats(ZkvFlag<true>, PS stats, long at, uint lane, float m, float bsum) {
  if (lane == 0) {
    stats[at * 2] = m;
    stats[at * 2 + 1] = bsum;
  }
}

template <typename PS>
inline void zkv_put_block_stats(ZkvFlag<false>, PS, long, uint, float, float) {}

// Online-softmax update with one key's score (log2 domain) and V row `row`; bsum is the running block sum.
template <int D, int VB, int VG, typename PV, typename SV>
inline void zkv_accumulate(PV v, SV v_scales, SV v_biases, long row, uint lane, float score, thread float& m,
                           thread float& l, thread float& bsum, thread float* o) {
  constexpr int VE = zkv_chunk(D, VB), VW = D / VE, VCH = (VW + 31) / 32;
  const float m_new = max(m, score);
  const float factor = exp2(m - m_new);
  const float p = exp2(score - m_new);
  l = l * factor + p;
  bsum = bsum * factor + p;
  m = m_new;
  for (int c = 0; c < VCH; c++) {
    const int w = c * 32 + int(lane);
    if (w < VW) {
      float x[VE];
      zkv_load_chunk<D, VG>(ZkvBits<VB>(), v, v_scales, v_biases, row, w, x);
      for (int j = 0; j < VE; j++) {
        o[c * VE + j] = o[c * VE + j] * factor + p * x[j];
      }
    }
  }
}

// This lane's part of q . key for a full-precision key row `p` (D elements) read in the K chunk layout of
// KE elements per lane word.
template <int D, int KE, typename P>
inline float zkv_dot_float_row(P p, uint lane, thread const float* qr) {
  constexpr int KW = D / KE, KCH = (KW + 31) / 32;
  float part = 0.0f;
  for (int c = 0; c < KCH; c++) {
    const int w = c * 32 + int(lane);
    if (w < KW) {
      for (int j = 0; j < KE; j++) {
        part += qr[c * KE + j] * float(p[w * KE + j]);
      }
    }
  }
  return part;
}

// This lane's part of q . key for sink position t (SINKS > 0 only: without sinks the slab may be a 1-element
// dummy, a `constant` pointer that a float row read must not be instantiated for).
template <int D, int KE, int SINKS, typename PG>
inline float zkv_sink_part(ZkvFlag<true>, PG k_sinks, int sink_slot, int n_kv_heads, int kv_head, int t, uint lane,
                           thread const float* qr) {
  return zkv_dot_float_row<D, KE>(k_sinks + ((long(sink_slot) * n_kv_heads + kv_head) * SINKS + t) * D, lane, qr);
}

template <int D, int KE, int SINKS, typename PG>
inline float zkv_sink_part(ZkvFlag<false>, PG, int, int, int, int, uint, thread const float*) {
  return 0.0f;
}

// Online softmax over the blocks of keys [t0, t1) (t0 a multiple of BS) for K and V in the token layouts
// (float or mx.quantize rows): SIMD-group sg walks blocks t0 / BS + sg, + NSG, ... Rows before `lo` (a sliding
// window's first visible row, inside the first block) are skipped. With MASS, writes each block's statistics
// to stats[stats_row + block index].
template <int D, int BS, int NSG, int KB, int KG, int VB, int VG, bool MASS,
          typename PK, typename SK, typename PV, typename SV, typename PT, typename PS>
inline void zkv_attend_blocks(PK k, SK k_scales, SK k_biases, PV v, SV v_scales, SV v_biases, PT table,
                              int kv_head, int n_kv_heads, int t0, int t1, int lo, uint sg, uint lane,
                              thread const float* qr, thread float& m, thread float& l, thread float* o,
                              PS stats, long stats_row) {
  constexpr int KE = zkv_chunk(D, KB), KW = D / KE, KCH = (KW + 31) / 32;
  for (int blk = t0 / BS + int(sg); blk * BS < t1; blk += NSG) {
    const long base = (long(table[blk]) * n_kv_heads + kv_head) * BS;
    const int end = min(t1, (blk + 1) * BS) - blk * BS;
    float bsum = 0.0f;
    for (int r = max(0, lo - blk * BS); r < end; r++) {
      float part = 0.0f;
      for (int c = 0; c < KCH; c++) {
        const int w = c * 32 + int(lane);
        if (w < KW) {
          float x[KE];
          zkv_load_chunk<D, KG>(ZkvBits<KB>(), k, k_scales, k_biases, base + r, w, x);
          for (int j = 0; j < KE; j++) {
            part += qr[c * KE + j] * x[j];
          }
        }
      }
      zkv_accumulate<D, VB, VG>(v, v_scales, v_biases, base + r, lane, simd_sum(part), m, l, bsum, o);
    }
    zkv_put_block_stats(ZkvFlag<MASS>(), stats, stats_row + blk, lane, m, bsum);
  }
}

// Per-channel key metadata as a float scale and bias (key = scale * q + bias). Float storage as is; uint8 is an
// e4m3 scale code and a zero point + 128 (zkv_mlx/kernels/kv_meta.py), so bias = -scale * zero point. Chosen
// by the element type of k_scales/k_biases: one kernel body serves both formats.
inline float zkv_e4m3(uint c) {
  const uint e = c >> 3, m = c & 7u;
  // subnormal codes are multiples of 2^-9; normal ones are built from their float32 bits (exact)
  return e == 0u ? float(m) * 0.001953125f : as_type<float>(((e + 120u) << 23) | (m << 20));
}

template <typename T>
inline void zkv_channel_meta(T s, T b, thread float& scale, thread float& bias) {
  scale = float(s);
  bias = float(b);
}

inline void zkv_channel_meta(uint8_t s, uint8_t z, thread float& scale, thread float& bias) {
  scale = zkv_e4m3(uint(s));
  bias = -(float(z) - 128.0f) * scale;
}

// The same walk with keys quantized per channel over each full block (KB bits, packed like mx.quantize;
// k_scales/k_biases [NB, n_kv_heads, 1, D], float or 8-bit: zkv_channel_meta), plus full-precision rows: the sequence's last block (holding
// position len - 1) from the tail slab k_tail [slots, n_kv_heads, BS, D] when k_slots[id * 2] >= 0, and
// positions < SINKS from the sink slab k_sinks [slots, n_kv_heads, SINKS, D] when the first block has
// k_slots[id * 2 + 1] >= 0 (with SINKS > 0, k_sinks has that shape even when no sequence has sink keys).
// Rows before `lo` are skipped; the sink slot is read only when a sink row is visible (with a sliding window
// the first block-table entry may be stale).
// A quantized block folds its scales into the query once:
// q . (s * x + b) = (q * s) . x + q . b.
template <int D, int BS, int NSG, int KB, int SINKS, int VB, int VG, bool MASS,
          typename PK, typename SK, typename PF, typename PG, typename PI, typename PV, typename SV,
          typename PT, typename PS>
inline void zkv_attend_channel(PK k, SK k_scales, SK k_biases, PF k_tail, PG k_sinks, PI k_slots, PV v,
                               SV v_scales, SV v_biases, PT table, int kv_head, int n_kv_heads, int len, int t0,
                               int t1, int lo, uint sg, uint lane, thread const float* qr, thread float& m,
                               thread float& l, thread float* o, PS stats, long stats_row) {
  constexpr int KE = 32 / KB, KW = D / KE, KCH = (KW + 31) / 32;
  constexpr uint MASK = (1u << KB) - 1u;
  const int last = (len - 1) / BS;
  const int sink_slot = SINKS > 0 && lo < SINKS ? int(k_slots[long(table[0]) * 2 + 1]) : -1;
  for (int blk = t0 / BS + int(sg); blk * BS < t1; blk += NSG) {
    const int id = table[blk];
    const long head_block = long(id) * n_kv_heads + kv_head;
    const int tail_slot = blk == last ? int(k_slots[long(id) * 2]) : -1;
    float qs[KCH * KE];
    float qb = 0.0f;
    for (int c = 0; c < KCH; c++) {
      const int w = c * 32 + int(lane);
      for (int j = 0; j < KE; j++) {
        const long ch = head_block * D + w * KE + j;
        const bool on = w < KW && tail_slot < 0;
        float cs = 0.0f, cb = 0.0f;
        if (on) {
          zkv_channel_meta(k_scales[ch], k_biases[ch], cs, cb);
        }
        qs[c * KE + j] = on ? qr[c * KE + j] * cs : 0.0f;
        qb += on ? qr[c * KE + j] * cb : 0.0f;
      }
    }
    const int end = min(t1, (blk + 1) * BS) - blk * BS;
    float bsum = 0.0f;
    for (int r = max(0, lo - blk * BS); r < end; r++) {
      const int t = blk * BS + r;
      float part;
      if (t < SINKS && sink_slot >= 0) {
        part = zkv_sink_part<D, KE, SINKS>(ZkvFlag<(SINKS > 0)>(), k_sinks, sink_slot, n_kv_heads, kv_head, t, lane,
                                           qr);
      } else if (tail_slot >= 0) {
        part = zkv_dot_float_row<D, KE>(k_tail + ((long(tail_slot) * n_kv_heads + kv_head) * BS + r) * D,
                                        lane, qr);
      } else {
        part = qb;
        for (int c = 0; c < KCH; c++) {
          const int w = c * 32 + int(lane);
          if (w < KW) {
            const uint word = k[(head_block * BS + r) * KW + w];
            for (int j = 0; j < KE; j++) {
              part += qs[c * KE + j] * float((word >> (KB * j)) & MASK);
            }
          }
        }
      }
      zkv_accumulate<D, VB, VG>(v, v_scales, v_biases, head_block * BS + r, lane, simd_sum(part), m, l, bsum, o);
    }
    zkv_put_block_stats(ZkvFlag<MASS>(), stats, stats_row + blk, lane, m, bsum);
  }
}
