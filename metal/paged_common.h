// Helpers for metal/paged_attention.metal, passed to mx.fast.metal_kernel as `header=`.
// MLX prepends its utils.h (using namespace metal; float16_t; bfloat16_t) to every custom kernel.
// Pointers are template parameters: an input under 8 elements (a short block table, the unused
// scales of a float pool) arrives as a `constant` pointer, which a `const device T*` parameter rejects.

// Elements per lane chunk of a K/V row of D elements stored with BITS bits (0 = float storage).
// Float rows: the smallest power of two that spreads the row over at most 32 lanes.
// Quantized rows: one packed uint32 word (mx.quantize layout: element j in bits [j*BITS, (j+1)*BITS)).
constexpr int zkv_chunk(int D, int BITS) {
  return BITS ? 32 / BITS : (D <= 32 ? 1 : D <= 64 ? 2 : D <= 128 ? 4 : 8);
}

template <int N>
struct ZkvBits {};

// Float storage: row `row` of a [rows, D] array.
template <int D, int GS, typename P, typename S>
inline void zkv_load_chunk(ZkvBits<0>, P data, S, S, long row, int w, thread float* x) {
  constexpr int E = zkv_chunk(D, 0);
  auto p = data + row * D + w * E;
  for (int j = 0; j < E; j++) {
    x[j] = float(p[j]);
  }
}

// Quantized storage: packed [rows, D * BITS / 32] uint32, scales and biases [rows, D / GS].
template <int D, int GS, int BITS, typename P, typename S>
inline void zkv_load_chunk(ZkvBits<BITS>, P data, S scales, S biases, long row, int w, thread float* x) {
  constexpr int E = 32 / BITS;
  constexpr uint MASK = (1u << BITS) - 1u;
  const uint word = data[row * (D / E) + w];
  const long g = row * (D / GS) + (w * E) / GS;
  const float s = float(scales[g]);
  const float b = float(biases[g]);
  for (int j = 0; j < E; j++) {
    x[j] = s * float((word >> (BITS * j)) & MASK) + b;
  }
}

// Online softmax over keys t0 + sg, t0 + sg + NSG, ... < t1 for one query head. Lane `lane` holds the
// query (pre-scaled by scale * log2(e)) in K chunk layout and the output accumulator in V chunk layout.
// m: running max (log2 domain), l: running sum of exp2(score - m).
template <int D, int BS, int NSG, int KB, int KG, int VB, int VG,
          typename PK, typename SK, typename PV, typename SV, typename PT>
inline void zkv_attend(PK k, SK k_scales, SK k_biases, PV v, SV v_scales, SV v_biases, PT table,
                       int kv_head, int n_kv_heads, int t0, int t1, uint sg, uint lane,
                       thread const float* qr, thread float& m, thread float& l, thread float* o) {
  constexpr int KE = zkv_chunk(D, KB), VE = zkv_chunk(D, VB);
  constexpr int KW = D / KE, VW = D / VE;
  constexpr int KCH = (KW + 31) / 32, VCH = (VW + 31) / 32;
  for (int t = t0 + int(sg); t < t1; t += NSG) {
    const long row = (long(table[t / BS]) * n_kv_heads + kv_head) * BS + t % BS;

    // Score of this key: every lane dots its chunks, the SIMD-group sums.
    float part = 0.0f;
    for (int c = 0; c < KCH; c++) {
      const int w = c * 32 + int(lane);
      if (w < KW) {
        float x[KE];
        zkv_load_chunk<D, KG>(ZkvBits<KB>(), k, k_scales, k_biases, row, w, x);
        for (int j = 0; j < KE; j++) {
          part += qr[c * KE + j] * x[j];
        }
      }
    }
    const float score = simd_sum(part);

    // Update the accumulators
    const float m_new = max(m, score);
    const float factor = exp2(m - m_new);
    const float p = exp2(score - m_new);
    l = l * factor + p;
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
}

// Loads this lane's query chunks, scaled so that scores come out in the log2 domain.
template <int D, int KB, typename PQ>
inline void zkv_load_query(PQ q, uint lane, float qscale, thread float* qr) {
  constexpr int KE = zkv_chunk(D, KB), KW = D / KE, KCH = (KW + 31) / 32;
  for (int c = 0; c < KCH; c++) {
    const int w = c * 32 + int(lane);
    for (int j = 0; j < KE; j++) {
      qr[c * KE + j] = w < KW ? float(q[w * KE + j]) * qscale : 0.0f;
    }
  }
}

// Writes one SIMD-group's softmax state to threadgroup memory for the cross-group merge.
template <int D, int VB>
inline void zkv_share_state(float m, float l, thread const float* o, uint sg, uint lane,
                            threadgroup float* tg_m, threadgroup float* tg_l, threadgroup float* tg_o) {
  constexpr int VE = zkv_chunk(D, VB), VW = D / VE, VCH = (VW + 31) / 32;
  if (lane == 0) {
    tg_m[sg] = m;
    tg_l[sg] = l;
  }
  for (int c = 0; c < VCH; c++) {
    const int w = c * 32 + int(lane);
    if (w < VW) {
      for (int j = 0; j < VE; j++) {
        tg_o[sg * D + w * VE + j] = o[c * VE + j];
      }
    }
  }
}

// First visible position of a sequence of len rows under a sliding window of `window` rows (0 = none): as
// mlx-lm's RotatingKVCache(max_size=window), the decode query sees its last `window` rows, its own included.
inline int zkv_window_start(int len, int window) {
  return window > 0 ? max(0, len - window) : 0;
}

// Output element from the merged unnormalised acc, sum l and max m (log2 domain). With SL, the query head's
// attention-sink logit (natural log units, as `sinks` of mx.fast.scaled_dot_product_attention) joins the
// softmax's denominator and contributes no value: acc / (l + exp(sink - m)). An empty context gives 0, not NaN.
template <int SL, typename PL>
inline float zkv_normalise(float acc, float l, float m, PL sink_logits, int h) {
  const float den = SL ? l + exp2(float(sink_logits[h]) * 1.44269504088896341f - m) : l;
  return l > 0.0f ? acc / den : 0.0f;
}

// Weight of a partial state with max m_s in a merge with global max m (0 for an empty partial).
inline float zkv_weight(float m_s, float m) {
  return m_s == -INFINITY ? 0.0f : exp2(m_s - m);
}

// Merges NSG partial states: returns the global max, sets l to the merged sum.
template <int NSG>
inline float zkv_merge_stats(threadgroup const float* tg_m, threadgroup const float* tg_l, thread float& l) {
  float m = -INFINITY;
  for (int s = 0; s < NSG; s++) {
    m = max(m, tg_m[s]);
  }
  l = 0.0f;
  for (int s = 0; s < NSG; s++) {
    l += tg_l[s] * zkv_weight(tg_m[s], m);
  }
  return m;
}

// Merged (unnormalised) output element d.
template <int D, int NSG>
inline float zkv_merge_out(threadgroup const float* tg_m, threadgroup const float* tg_o, float m, int d) {
  float acc = 0.0f;
  for (int s = 0; s < NSG; s++) {
    acc += tg_o[s * D + d] * zkv_weight(tg_m[s], m);
  }
  return acc;
}
