// Paged decode attention: kernel bodies for mx.fast.metal_kernel (helpers: paged_common.h via header=).
// zkv_mlx/kernels/registry.py splits this file at the "//// kernel:" lines; each section is one body.
//
// Inputs (the attention kernels take the first twelve the same way):
//   q [B, n_heads, 1, D] (T); k, v: [NB, n_kv_heads, BS, D] float storage, or mx.quantize packed uint32
//   [NB, n_kv_heads, BS, D*bits/32] with k_scales/k_biases [NB, n_kv_heads, BS, D/group] (a 1-element
//   dummy when K is float; same for V); block_tables [B, max_blocks] int32; context_lens [B] int32;
//   scale: 0-d float; window: 0-d int, a sliding window of that many rows for every sequence (0 = none;
//   blocks wholly before it are never read, their block-table entries may be stale); sink_logits: float
//   [n_heads] attention-sink logits (a 1-element dummy without SL).
// Template: T (q/out dtype), D, BS (block size), NSG (SIMD-groups per threadgroup), KB/KG and VB/VG
//   (bits and group size of K and V; 0 bits = float storage), SL (1: sink logits in the softmax).

//// kernel: paged_attention_1pass
  // One threadgroup of NSG SIMD-groups per (sequence, query head); SIMD-group sg takes keys sg, sg + NSG, ...
  // Grid: (NSG * 32 * B * n_heads, 1, 1), threadgroup (NSG * 32, 1, 1).
  constexpr int KE = zkv_chunk(D, KB), KCH = (D / KE + 31) / 32;
  constexpr int VE = zkv_chunk(D, VB), VCH = (D / VE + 31) / 32;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const int n_heads = q_shape[1];
  const int n_kv_heads = k_shape[1];
  const int head = threadgroup_position_in_grid.x;  // b * n_heads + h
  const int b = head / n_heads;
  const int kv_head = (head % n_heads) / (n_heads / n_kv_heads);
  const int len = context_lens[b];
  const int lo = zkv_window_start(len, window);  // sliding window: rows before lo are not read
  auto table = block_tables + b * block_tables_shape[1];

  float qr[KCH * KE];
  zkv_load_query<D, KB>(q + head * D, lane, scale * 1.44269504088896341f, qr);
  float m = -INFINITY;
  float l = 0.0f;
  float o[VCH * VE];
  for (int i = 0; i < VCH * VE; i++) {
    o[i] = 0.0f;
  }
  zkv_attend<D, BS, NSG, KB, KG, VB, VG>(k, k_scales, k_biases, v, v_scales, v_biases, table, kv_head,
                                         n_kv_heads, lo, len, sg, lane, qr, m, l, o);

  // Merge the SIMD-groups' partial softmax states
  threadgroup float tg_m[NSG], tg_l[NSG], tg_o[NSG * D];
  zkv_share_state<D, VB>(m, l, o, sg, lane, tg_m, tg_l, tg_o);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float l_all;
  const float m_all = zkv_merge_stats<NSG>(tg_m, tg_l, l_all);
  for (int d = thread_index_in_threadgroup; d < D; d += NSG * 32) {
    const float acc = zkv_merge_out<D, NSG>(tg_m, tg_o, m_all, d);
    out[head * D + d] = static_cast<T>(zkv_normalise<SL>(acc, l_all, m_all, sink_logits, head % n_heads));
  }

//// kernel: paged_attention_2pass_partial
  // Split-context pass 1: threadgroup (head, split) attends over keys [split * partition, + partition) and
  // writes its unnormalised output and (max, sum); splits past a sequence's end write an empty state.
  // Grid: (NSG * 32 * B * n_heads, n_splits, 1), threadgroup (NSG * 32, 1, 1).
  // Outputs: o_part [B * n_heads, n_splits, D] float, ml [B * n_heads, n_splits, 2] float.
  constexpr int KE = zkv_chunk(D, KB), KCH = (D / KE + 31) / 32;
  constexpr int VE = zkv_chunk(D, VB), VCH = (D / VE + 31) / 32;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const int n_heads = q_shape[1];
  const int n_kv_heads = k_shape[1];
  const int head = threadgroup_position_in_grid.x;
  const int split = threadgroup_position_in_grid.y;
  const int n_splits = threadgroups_per_grid.y;
  const int b = head / n_heads;
  const int kv_head = (head % n_heads) / (n_heads / n_kv_heads);
  const int len = context_lens[b];
  const int lo = zkv_window_start(len, window);  // sliding window: rows before lo are not read
  const int t0 = (lo / BS) * BS + split * partition;
  const int t1 = min(len, t0 + partition);
  auto table = block_tables + b * block_tables_shape[1];

  float qr[KCH * KE];
  zkv_load_query<D, KB>(q + head * D, lane, scale * 1.44269504088896341f, qr);
  float m = -INFINITY;
  float l = 0.0f;
  float o[VCH * VE];
  for (int i = 0; i < VCH * VE; i++) {
    o[i] = 0.0f;
  }
  zkv_attend<D, BS, NSG, KB, KG, VB, VG>(k, k_scales, k_biases, v, v_scales, v_biases, table, kv_head,
                                         n_kv_heads, max(t0, lo), t1, sg, lane, qr, m, l, o);

  // Merge the SIMD-groups, keep the result unnormalised for pass 2
  threadgroup float tg_m[NSG], tg_l[NSG], tg_o[NSG * D];
  zkv_share_state<D, VB>(m, l, o, sg, lane, tg_m, tg_l, tg_o);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float l_all;
  const float m_all = zkv_merge_stats<NSG>(tg_m, tg_l, l_all);
  const int slot = head * n_splits + split;
  for (int d = thread_index_in_threadgroup; d < D; d += NSG * 32) {
    o_part[slot * D + d] = zkv_merge_out<D, NSG>(tg_m, tg_o, m_all, d);
  }
  if (thread_index_in_threadgroup == 0) {
    ml[slot * 2] = m_all;
    ml[slot * 2 + 1] = l_all;
  }

//// kernel: paged_attention_2pass_reduce
  // Split-context pass 2: one threadgroup per (sequence, query head) merges the n_splits partial states.
  // Grid: (NT * B * n_heads, 1, 1), threadgroup (NT, 1, 1). Inputs: o_part, ml, sink_logits. Template: T, D, SL.
  const int head = threadgroup_position_in_grid.x;
  const int n_splits = o_part_shape[1];
  float m = -INFINITY;
  for (int s = 0; s < n_splits; s++) {
    m = max(m, ml[(head * n_splits + s) * 2]);
  }
  float l = 0.0f;
  for (int s = 0; s < n_splits; s++) {
    l += ml[(head * n_splits + s) * 2 + 1] * zkv_weight(ml[(head * n_splits + s) * 2], m);
  }
  for (uint d = thread_position_in_threadgroup.x; d < D; d += threads_per_threadgroup.x) {
    float acc = 0.0f;
    for (int s = 0; s < n_splits; s++) {
      acc += o_part[(head * n_splits + s) * D + d] * zkv_weight(ml[(head * n_splits + s) * 2], m);
    }
    out[head * D + d] = static_cast<T>(zkv_normalise<SL>(acc, l, m, sink_logits, head % sink_logits_shape[0]));
  }

//// kernel: paged_attention_1pass_mass
  // paged_attention_1pass with SIMD-groups walking whole blocks (paged_blocks.h) and the statistics of the
  // attention-mass output (paged_attention_mass turns them into the mass).
  // Grid: (NSG * 32 * B * n_heads, 1, 1), threadgroup (NSG * 32, 1, 1).
  // Outputs: out as paged_attention_1pass; ml [B * n_heads, 1, 2] (max, sum) and
  // bstats [B * n_heads, max_blocks, 2] (per block: running max, exp2 sum), float.
  constexpr int KE = zkv_chunk(D, KB), KCH = (D / KE + 31) / 32;
  constexpr int VE = zkv_chunk(D, VB), VCH = (D / VE + 31) / 32;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const int n_heads = q_shape[1];
  const int n_kv_heads = k_shape[1];
  const int head = threadgroup_position_in_grid.x;  // b * n_heads + h
  const int b = head / n_heads;
  const int kv_head = (head % n_heads) / (n_heads / n_kv_heads);
  const int len = context_lens[b];
  const int lo = zkv_window_start(len, window);  // sliding window: rows before lo are not read
  const int max_blocks = block_tables_shape[1];
  auto table = block_tables + b * max_blocks;

  float qr[KCH * KE];
  zkv_load_query<D, KB>(q + head * D, lane, scale * 1.44269504088896341f, qr);
  float m = -INFINITY;
  float l = 0.0f;
  float o[VCH * VE];
  for (int i = 0; i < VCH * VE; i++) {
    o[i] = 0.0f;
  }
  zkv_attend_blocks<D, BS, NSG, KB, KG, VB, VG, true>(k, k_scales, k_biases, v, v_scales, v_biases, table,
                                                      kv_head, n_kv_heads, (lo / BS) * BS, len, lo, sg, lane, qr, m,
                                                      l, o, bstats, long(head) * max_blocks);

  threadgroup float tg_m[NSG], tg_l[NSG], tg_o[NSG * D];
  zkv_share_state<D, VB>(m, l, o, sg, lane, tg_m, tg_l, tg_o);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float l_all;
  const float m_all = zkv_merge_stats<NSG>(tg_m, tg_l, l_all);
  for (int d = thread_index_in_threadgroup; d < D; d += NSG * 32) {
    const float acc = zkv_merge_out<D, NSG>(tg_m, tg_o, m_all, d);
    out[head * D + d] = static_cast<T>(zkv_normalise<SL>(acc, l_all, m_all, sink_logits, head % n_heads));
  }
  if (thread_index_in_threadgroup == 0) {
    ml[head * 2] = m_all;
    ml[head * 2 + 1] = l_all;
  }

//// kernel: paged_attention_2pass_partial_mass
  // paged_attention_2pass_partial with SIMD-groups walking whole blocks and the block statistics of the mass
  // output (bstats [B * n_heads, max_blocks, 2] float; each block is written by the split that holds it).
  // Grid: (NSG * 32 * B * n_heads, n_splits, 1), threadgroup (NSG * 32, 1, 1). Pass 2: paged_attention_2pass_reduce.
  constexpr int KE = zkv_chunk(D, KB), KCH = (D / KE + 31) / 32;
  constexpr int VE = zkv_chunk(D, VB), VCH = (D / VE + 31) / 32;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const int n_heads = q_shape[1];
  const int n_kv_heads = k_shape[1];
  const int head = threadgroup_position_in_grid.x;
  const int split = threadgroup_position_in_grid.y;
  const int n_splits = threadgroups_per_grid.y;
  const int b = head / n_heads;
  const int kv_head = (head % n_heads) / (n_heads / n_kv_heads);
  const int len = context_lens[b];
  const int lo = zkv_window_start(len, window);  // sliding window: rows before lo are not read
  const int t0 = (lo / BS) * BS + split * partition;
  const int t1 = min(len, t0 + partition);
  const int max_blocks = block_tables_shape[1];
  auto table = block_tables + b * max_blocks;

  float qr[KCH * KE];
  zkv_load_query<D, KB>(q + head * D, lane, scale * 1.44269504088896341f, qr);
  float m = -INFINITY;
  float l = 0.0f;
  float o[VCH * VE];
  for (int i = 0; i < VCH * VE; i++) {
    o[i] = 0.0f;
  }
  zkv_attend_blocks<D, BS, NSG, KB, KG, VB, VG, true>(k, k_scales, k_biases, v, v_scales, v_biases, table,
                                                      kv_head, n_kv_heads, t0, t1, lo, sg, lane, qr, m, l, o,
                                                      bstats, long(head) * max_blocks);

  threadgroup float tg_m[NSG], tg_l[NSG], tg_o[NSG * D];
  zkv_share_state<D, VB>(m, l, o, sg, lane, tg_m, tg_l, tg_o);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float l_all;
  const float m_all = zkv_merge_stats<NSG>(tg_m, tg_l, l_all);
  const int slot = head * n_splits + split;
  for (int d = thread_index_in_threadgroup; d < D; d += NSG * 32) {
    o_part[slot * D + d] = zkv_merge_out<D, NSG>(tg_m, tg_o, m_all, d);
  }
  if (thread_index_in_threadgroup == 0) {
    ml[slot * 2] = m_all;
    ml[slot * 2 + 1] = l_all;
  }

//// kernel: paged_attention_ck_1pass
  // One pass with keys quantized per channel over each full block, the tail block and the sinks in full
  // precision (ChannelKeyPool; zkv_attend_channel in paged_blocks.h). Inputs: q, k, k_scales, k_biases,
  // k_tail, k_sinks, k_slots, v, v_scales, v_biases, block_tables, context_lens, scale.
  // Template: T, D, BS, NSG, KB, SINKS (sink tokens), VB, VG, SL (sink logits). Grid and output as
  // paged_attention_1pass.
  constexpr int KE = 32 / KB, KCH = (D / KE + 31) / 32;
  constexpr int VE = zkv_chunk(D, VB), VCH = (D / VE + 31) / 32;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const int n_heads = q_shape[1];
  const int n_kv_heads = k_shape[1];
  const int head = threadgroup_position_in_grid.x;
  const int b = head / n_heads;
  const int kv_head = (head % n_heads) / (n_heads / n_kv_heads);
  const int len = context_lens[b];
  const int lo = zkv_window_start(len, window);  // sliding window: rows before lo are not read
  auto table = block_tables + b * block_tables_shape[1];

  float qr[KCH * KE];
  zkv_load_query<D, KB>(q + head * D, lane, scale * 1.44269504088896341f, qr);
  float m = -INFINITY;
  float l = 0.0f;
  float o[VCH * VE];
  for (int i = 0; i < VCH * VE; i++) {
    o[i] = 0.0f;
  }
  zkv_attend_channel<D, BS, NSG, KB, SINKS, VB, VG, false>(k, k_scales, k_biases, k_tail, k_sinks, k_slots, v,
                                                           v_scales, v_biases, table, kv_head, n_kv_heads, len,
                                                           (lo / BS) * BS, len, lo, sg, lane, qr, m, l, o, out, 0);

  threadgroup float tg_m[NSG], tg_l[NSG], tg_o[NSG * D];
  zkv_share_state<D, VB>(m, l, o, sg, lane, tg_m, tg_l, tg_o);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float l_all;
  const float m_all = zkv_merge_stats<NSG>(tg_m, tg_l, l_all);
  for (int d = thread_index_in_threadgroup; d < D; d += NSG * 32) {
    const float acc = zkv_merge_out<D, NSG>(tg_m, tg_o, m_all, d);
    out[head * D + d] = static_cast<T>(zkv_normalise<SL>(acc, l_all, m_all, sink_logits, head % n_heads));
  }

//// kernel: paged_attention_ck_1pass_mass
  // paged_attention_ck_1pass with the mass statistics (outputs as paged_attention_1pass_mass).
  constexpr int KE = 32 / KB, KCH = (D / KE + 31) / 32;
  constexpr int VE = zkv_chunk(D, VB), VCH = (D / VE + 31) / 32;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const int n_heads = q_shape[1];
  const int n_kv_heads = k_shape[1];
  const int head = threadgroup_position_in_grid.x;
  const int b = head / n_heads;
  const int kv_head = (head % n_heads) / (n_heads / n_kv_heads);
  const int len = context_lens[b];
  const int lo = zkv_window_start(len, window);  // sliding window: rows before lo are not read
  const int max_blocks = block_tables_shape[1];
  auto table = block_tables + b * max_blocks;

  float qr[KCH * KE];
  zkv_load_query<D, KB>(q + head * D, lane, scale * 1.44269504088896341f, qr);
  float m = -INFINITY;
  float l = 0.0f;
  float o[VCH * VE];
  for (int i = 0; i < VCH * VE; i++) {
    o[i] = 0.0f;
  }
  zkv_attend_channel<D, BS, NSG, KB, SINKS, VB, VG, true>(k, k_scales, k_biases, k_tail, k_sinks, k_slots, v,
                                                          v_scales, v_biases, table, kv_head, n_kv_heads, len,
                                                          (lo / BS) * BS, len, lo, sg, lane, qr, m, l, o, bstats,
                                                          long(head) * max_blocks);

  threadgroup float tg_m[NSG], tg_l[NSG], tg_o[NSG * D];
  zkv_share_state<D, VB>(m, l, o, sg, lane, tg_m, tg_l, tg_o);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float l_all;
  const float m_all = zkv_merge_stats<NSG>(tg_m, tg_l, l_all);
  for (int d = thread_index_in_threadgroup; d < D; d += NSG * 32) {
    const float acc = zkv_merge_out<D, NSG>(tg_m, tg_o, m_all, d);
    out[head * D + d] = static_cast<T>(zkv_normalise<SL>(acc, l_all, m_all, sink_logits, head % n_heads));
  }
  if (thread_index_in_threadgroup == 0) {
    ml[head * 2] = m_all;
    ml[head * 2 + 1] = l_all;
  }

//// kernel: paged_attention_ck_2pass_partial
  // Split-context pass 1 for per-channel keys (inputs as paged_attention_ck_1pass, then partition; outputs
  // and grid as paged_attention_2pass_partial). Pass 2: paged_attention_2pass_reduce.
  constexpr int KE = 32 / KB, KCH = (D / KE + 31) / 32;
  constexpr int VE = zkv_chunk(D, VB), VCH = (D / VE + 31) / 32;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const int n_heads = q_shape[1];
  const int n_kv_heads = k_shape[1];
  const int head = threadgroup_position_in_grid.x;
  const int split = threadgroup_position_in_grid.y;
  const int n_splits = threadgroups_per_grid.y;
  const int b = head / n_heads;
  const int kv_head = (head % n_heads) / (n_heads / n_kv_heads);
  const int len = context_lens[b];
  const int lo = zkv_window_start(len, window);  // sliding window: rows before lo are not read
  const int t0 = (lo / BS) * BS + split * partition;
  const int t1 = min(len, t0 + partition);
  auto table = block_tables + b * block_tables_shape[1];

  float qr[KCH * KE];
  zkv_load_query<D, KB>(q + head * D, lane, scale * 1.44269504088896341f, qr);
  float m = -INFINITY;
  float l = 0.0f;
  float o[VCH * VE];
  for (int i = 0; i < VCH * VE; i++) {
    o[i] = 0.0f;
  }
  zkv_attend_channel<D, BS, NSG, KB, SINKS, VB, VG, false>(k, k_scales, k_biases, k_tail, k_sinks, k_slots, v,
                                                           v_scales, v_biases, table, kv_head, n_kv_heads, len,
                                                           t0, t1, lo, sg, lane, qr, m, l, o, o_part, 0);

  threadgroup float tg_m[NSG], tg_l[NSG], tg_o[NSG * D];
  zkv_share_state<D, VB>(m, l, o, sg, lane, tg_m, tg_l, tg_o);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float l_all;
  const float m_all = zkv_merge_stats<NSG>(tg_m, tg_l, l_all);
  const int slot = head * n_splits + split;
  for (int d = thread_index_in_threadgroup; d < D; d += NSG * 32) {
    o_part[slot * D + d] = zkv_merge_out<D, NSG>(tg_m, tg_o, m_all, d);
  }
  if (thread_index_in_threadgroup == 0) {
    ml[slot * 2] = m_all;
    ml[slot * 2 + 1] = l_all;
  }

//// kernel: paged_attention_ck_2pass_partial_mass
  // paged_attention_ck_2pass_partial with the mass statistics (bstats as paged_attention_2pass_partial_mass).
  constexpr int KE = 32 / KB, KCH = (D / KE + 31) / 32;
  constexpr int VE = zkv_chunk(D, VB), VCH = (D / VE + 31) / 32;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const int n_heads = q_shape[1];
  const int n_kv_heads = k_shape[1];
  const int head = threadgroup_position_in_grid.x;
  const int split = threadgroup_position_in_grid.y;
  const int n_splits = threadgroups_per_grid.y;
  const int b = head / n_heads;
  const int kv_head = (head % n_heads) / (n_heads / n_kv_heads);
  const int len = context_lens[b];
  const int lo = zkv_window_start(len, window);  // sliding window: rows before lo are not read
  const int t0 = (lo / BS) * BS + split * partition;
  const int t1 = min(len, t0 + partition);
  const int max_blocks = block_tables_shape[1];
  auto table = block_tables + b * max_blocks;

  float qr[KCH * KE];
  zkv_load_query<D, KB>(q + head * D, lane, scale * 1.44269504088896341f, qr);
  float m = -INFINITY;
  float l = 0.0f;
  float o[VCH * VE];
  for (int i = 0; i < VCH * VE; i++) {
    o[i] = 0.0f;
  }
  zkv_attend_channel<D, BS, NSG, KB, SINKS, VB, VG, true>(k, k_scales, k_biases, k_tail, k_sinks, k_slots, v,
                                                          v_scales, v_biases, table, kv_head, n_kv_heads, len,
                                                          t0, t1, lo, sg, lane, qr, m, l, o, bstats,
                                                          long(head) * max_blocks);

  threadgroup float tg_m[NSG], tg_l[NSG], tg_o[NSG * D];
  zkv_share_state<D, VB>(m, l, o, sg, lane, tg_m, tg_l, tg_o);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float l_all;
  const float m_all = zkv_merge_stats<NSG>(tg_m, tg_l, l_all);
  const int slot = head * n_splits + split;
  for (int d = thread_index_in_threadgroup; d < D; d += NSG * 32) {
    o_part[slot * D + d] = zkv_merge_out<D, NSG>(tg_m, tg_o, m_all, d);
  }
  if (thread_index_in_threadgroup == 0) {
    ml[slot * 2] = m_all;
    ml[slot * 2 + 1] = l_all;
  }

//// kernel: paged_attention_mass
  // Attention mass per block-table entry from the block statistics of a *_mass kernel:
  // mass[b, j] = sum over heads h of bsum[h, j] * exp2(m[h, j] - M_h) / L_h, with (M_h, L_h) merged from the
  // n_splits (max, sum) states in ml (1 for one pass); 0 for entries at or past the sequence's length or
  // wholly before its window. With SL the sink logit joins L_h as in zkv_normalise.
  // Inputs: bstats [B * n_heads, max_blocks, 2], ml [B * n_heads, n_splits, 2], context_lens [B], window,
  // sink_logits. Template: BS, SL. Grid: (max_blocks, B, 1), threadgroup (min(64, max_blocks), 1, 1).
  // Output: mass [B, max_blocks].
  const int j = thread_position_in_grid.x;
  const int b = thread_position_in_grid.y;
  const int max_blocks = bstats_shape[1];
  const int n_heads = bstats_shape[0] / context_lens_shape[0];
  const int n_splits = ml_shape[1];
  if (j >= max_blocks) {
    return;
  }
  float acc = 0.0f;
  const int len = context_lens[b];
  // entries past the end or wholly before the window hold no visible row (and no statistics were written)
  if (j * BS < len && (j + 1) * BS > zkv_window_start(len, window)) {
    for (int h = b * n_heads; h < (b + 1) * n_heads; h++) {
      float m = -INFINITY;
      for (int s = 0; s < n_splits; s++) {
        m = max(m, ml[(h * n_splits + s) * 2]);
      }
      float l = 0.0f;
      for (int s = 0; s < n_splits; s++) {
        l += ml[(h * n_splits + s) * 2 + 1] * zkv_weight(ml[(h * n_splits + s) * 2], m);
      }
      const long at = (long(h) * max_blocks + j) * 2;
      const float den = SL ? l + exp2(float(sink_logits[h % n_heads]) * 1.44269504088896341f - m) : l;
      acc += l > 0.0f ? bstats[at + 1] * exp2(bstats[at] - m) / den : 0.0f;
    }
  }
  mass[b * max_blocks + j] = acc;
