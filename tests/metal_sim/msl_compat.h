// Strict MSL subset that simulated kernels compile against (force-included; built with -nostdinc, so
// `std::`, `expf`, `printf` and other non-MSL names do not exist). Address spaces: `device` and `thread`
// vanish; `constant` becomes `volatile`, so a helper written for `const device T*` rejects the
// `constant` pointer MLX passes for small inputs, as the Metal compiler does. `threadgroup` storage is
// rewritten by the build (build.py) into static storage shared by the fibers of a threadgroup.
#pragma once
#include "sim_abi.h"
#include "msl_types.h"

#define device
#define thread
#define constant volatile
#define METAL_FUNC inline
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define HUGE_VALF __builtin_inff()
#define MAXFLOAT 3.40282347e+38f
#define FLT_MAX 3.40282347e+38f
#define FLT_MIN 1.17549435e-38f
#define FLT_EPSILON 1.19209290e-7f
#define HALF_MAX 65504.0f
#define M_PI_F 3.14159265358979323846f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LN2_F 0.69314718055994530942f

namespace metal {

// ---- math: float natively, half and bfloat through float, vectors elementwise
#define ZSIM_MATH1(NAME, EXPR)                                                          \
  inline float NAME(float x) { return EXPR; }                                          \
  inline half NAME(half h) { float x = float(h); return half(EXPR); }                  \
  inline bfloat NAME(bfloat b) { float x = float(b); return bfloat(EXPR); }            \
  template <typename T, int N> vec<T, N> NAME(vec<T, N> v) {                           \
    vec<T, N> r; for (int i = 0; i < N; i++) r[i] = NAME(v[i]); return r; }
#define ZSIM_MATH_ALL                                                                    \
  ZSIM_MATH1(exp, __builtin_expf(x)) ZSIM_MATH1(exp2, __builtin_exp2f(x))                 \
  ZSIM_MATH1(exp10, __builtin_powf(10.0f, x)) ZSIM_MATH1(log, __builtin_logf(x))          \
  ZSIM_MATH1(log2, __builtin_log2f(x)) ZSIM_MATH1(log10, __builtin_log10f(x))             \
  ZSIM_MATH1(sqrt, __builtin_sqrtf(x)) ZSIM_MATH1(rsqrt, 1.0f / __builtin_sqrtf(x))        \
  ZSIM_MATH1(sin, __builtin_sinf(x)) ZSIM_MATH1(cos, __builtin_cosf(x))                   \
  ZSIM_MATH1(tan, __builtin_tanf(x)) ZSIM_MATH1(tanh, __builtin_tanhf(x))                 \
  ZSIM_MATH1(floor, __builtin_floorf(x)) ZSIM_MATH1(ceil, __builtin_ceilf(x))             \
  ZSIM_MATH1(round, __builtin_roundf(x)) ZSIM_MATH1(rint, __builtin_rintf(x))             \
  ZSIM_MATH1(trunc, __builtin_truncf(x)) ZSIM_MATH1(fabs, __builtin_fabsf(x))             \
  ZSIM_MATH1(erf, __builtin_erff(x)) ZSIM_MATH1(log1p, __builtin_log1pf(x))               \
  ZSIM_MATH1(expm1, __builtin_expm1f(x))                                                  \
  ZSIM_MATH1(sign, x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : x == x ? 0.0f : x)
ZSIM_MATH_ALL
namespace fast { ZSIM_MATH_ALL }
namespace precise { ZSIM_MATH_ALL }

#define ZSIM_MATH2(NAME, EXPR)                                                          \
  inline float NAME(float x, float y) { return EXPR; }                                 \
  inline half NAME(half a, half b) { float x = float(a), y = float(b); return half(EXPR); } \
  inline bfloat NAME(bfloat a, bfloat b) { float x = float(a), y = float(b); return bfloat(EXPR); }
ZSIM_MATH2(pow, __builtin_powf(x, y)) ZSIM_MATH2(powr, __builtin_powf(x, y))
ZSIM_MATH2(fmod, __builtin_fmodf(x, y)) ZSIM_MATH2(fmin, __builtin_fminf(x, y))
ZSIM_MATH2(fmax, __builtin_fmaxf(x, y)) ZSIM_MATH2(copysign, __builtin_copysignf(x, y))
ZSIM_MATH2(atan2, __builtin_atan2f(x, y))
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return half(__builtin_fmaf(float(a), float(b), float(c))); }

// min/max/clamp/abs for any arithmetic type (both arguments of one type, as in Metal).
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
template <typename T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T> inline T abs(T x) { return x < T(0) ? T(-x) : x; }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float saturate(float x) { return clamp(x, 0.0f, 1.0f); }
inline float mix(float a, float b, float t) { return a + (b - a) * t; }
template <typename T> inline T select(T a, T b, bool c) { return c ? b : a; }
inline bool isnan(float x) { return x != x; }
inline bool isinf(float x) { return __builtin_fabsf(x) == __builtin_inff(); }
inline bool isfinite(float x) { return !isnan(x) && !isinf(x); }
inline bool signbit(float x) { return __builtin_signbit(x); }
inline bool isnan(half x) { return isnan(float(x)); }
inline bool isinf(half x) { return isinf(float(x)); }
inline bool isnan(bfloat x) { return isnan(float(x)); }
inline bool isinf(bfloat x) { return isinf(float(x)); }
inline uint popcount(uint x) { return (uint)__builtin_popcount(x); }
inline uint popcount(ulong x) { return (uint)__builtin_popcountl(x); }
inline uint clz(uint x) { return x ? (uint)__builtin_clz(x) : 32u; }
inline uint ctz(uint x) { return x ? (uint)__builtin_ctz(x) : 32u; }
template <typename T, int N> inline T dot(vec<T, N> a, vec<T, N> b) {
  T r = a[0] * b[0];
  for (int i = 1; i < N; i++) r = r + a[i] * b[i];
  return r;
}

// ---- synchronisation. Call sites are numbered by __COUNTER__ (see runtime.cpp: resolve_simd).
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4,
                       mem_threadgroup_imageblock = 8, mem_object_data = 16 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
inline void _zsim_tg_barrier(int site, mem_flags) { zsim_barrier(site); }
inline void _zsim_simd_barrier(int site, mem_flags) { char c = 0, all[32]; zsim_simd_sync(site, &c, 1, all); }

template <typename T> inline uint _zsim_gather(int site, T x, T* all) {
  static_assert(sizeof(T) <= 64, "SIMD collective on a value larger than 64 bytes");
  return zsim_simd_sync(site, &x, sizeof(T), all);
}
#define ZSIM_REDUCE(NAME, INIT, STEP, PREFIX_COND)                                     \
  template <typename T> T NAME(int site, T x) {                                        \
    T v[32]; uint m = _zsim_gather(site, x, v), me = zsim_lane(); T r = INIT; bool first = true; \
    for (uint i = 0; i < 32; i++) if ((m >> i & 1u) && (PREFIX_COND)) {                 \
      T a = v[i]; r = first ? a : T(STEP); first = false; }                             \
    (void)me; return r; }
ZSIM_REDUCE(_zsim_simd_sum, T(0), r + a, true)
ZSIM_REDUCE(_zsim_simd_product, T(1), r * a, true)
ZSIM_REDUCE(_zsim_simd_max, T(0), max(r, a), true)
ZSIM_REDUCE(_zsim_simd_min, T(0), min(r, a), true)
ZSIM_REDUCE(_zsim_simd_and, T(0), r & a, true)
ZSIM_REDUCE(_zsim_simd_or, T(0), r | a, true)
ZSIM_REDUCE(_zsim_simd_xor, T(0), r ^ a, true)
ZSIM_REDUCE(_zsim_simd_prefix_inclusive_sum, T(0), r + a, i <= me)
ZSIM_REDUCE(_zsim_simd_prefix_exclusive_sum, T(0), r + a, i < me)
ZSIM_REDUCE(_zsim_simd_prefix_inclusive_product, T(1), r * a, i <= me)
ZSIM_REDUCE(_zsim_simd_prefix_exclusive_product, T(1), r * a, i < me)

// Reading an inactive lane gives poison (all bits set: NaN for floats), as it is undefined in Metal.
template <typename T> T _zsim_read_lane(int site, T x, int src, bool keep_own_if_outside) {
  T v[32];
  uint m = _zsim_gather(site, x, v), me = zsim_lane();
  if (src < 0 || src > 31) {
    if (keep_own_if_outside) return x;
    src &= 31;
  }
  (void)me;
  if (m >> src & 1u) return v[src];
  T poison;
  __builtin_memset((void*)&poison, 0xFF, sizeof(T));
  return poison;
}
template <typename T> T _zsim_simd_shuffle(int s, T x, ushort l) { return _zsim_read_lane(s, x, l, false); }
template <typename T> T _zsim_simd_broadcast(int s, T x, ushort l) { return _zsim_read_lane(s, x, l, false); }
template <typename T> T _zsim_simd_shuffle_xor(int s, T x, ushort k) { return _zsim_read_lane(s, x, int(zsim_lane() ^ k), false); }
template <typename T> T _zsim_simd_shuffle_up(int s, T x, ushort d) { return _zsim_read_lane(s, x, int(zsim_lane()) - d, true); }
template <typename T> T _zsim_simd_shuffle_down(int s, T x, ushort d) { return _zsim_read_lane(s, x, int(zsim_lane()) + d, true); }
template <typename T> T _zsim_simd_shuffle_rotate_up(int s, T x, ushort d) { return _zsim_read_lane(s, x, int(zsim_lane() - d) & 31, false); }
template <typename T> T _zsim_simd_shuffle_rotate_down(int s, T x, ushort d) { return _zsim_read_lane(s, x, int(zsim_lane() + d) & 31, false); }
template <typename T> T _zsim_simd_broadcast_first(int site, T x) {
  T v[32];
  uint m = _zsim_gather(site, x, v);
  return v[__builtin_ctz(m)];
}
inline bool _zsim_simd_all(int site, bool x) { bool v[32]; uint m = _zsim_gather(site, x, v); for (int i = 0; i < 32; i++) if ((m >> i & 1u) && !v[i]) return false; return true; }
inline bool _zsim_simd_any(int site, bool x) { bool v[32]; uint m = _zsim_gather(site, x, v); for (int i = 0; i < 32; i++) if ((m >> i & 1u) && v[i]) return true; return false; }
struct simd_vote {
  ulong v;
  explicit operator ulong() const { return v; }
  bool all() const { return v == 0xFFFFFFFFul; }
  bool any() const { return v != 0; }
};
inline simd_vote _zsim_simd_ballot(int site, bool x) {
  bool v[32]; uint m = _zsim_gather(site, x, v); ulong r = 0;
  for (int i = 0; i < 32; i++) if ((m >> i & 1u) && v[i]) r |= 1ul << i;
  return simd_vote{r};
}
inline simd_vote _zsim_simd_active_threads_mask(int site) { char v[32]; return simd_vote{_zsim_gather(site, char(0), v)}; }
inline bool _zsim_simd_is_first(int site) { char v[32]; uint m = _zsim_gather(site, char(0), v); return zsim_lane() == (uint)__builtin_ctz(m); }

#define threadgroup_barrier(...) _zsim_tg_barrier(__COUNTER__, __VA_ARGS__)
#define simdgroup_barrier(...) _zsim_simd_barrier(__COUNTER__, __VA_ARGS__)
#define simd_sum(...) _zsim_simd_sum(__COUNTER__, __VA_ARGS__)
#define simd_product(...) _zsim_simd_product(__COUNTER__, __VA_ARGS__)
#define simd_max(...) _zsim_simd_max(__COUNTER__, __VA_ARGS__)
#define simd_min(...) _zsim_simd_min(__COUNTER__, __VA_ARGS__)
#define simd_and(...) _zsim_simd_and(__COUNTER__, __VA_ARGS__)
#define simd_or(...) _zsim_simd_or(__COUNTER__, __VA_ARGS__)
#define simd_xor(...) _zsim_simd_xor(__COUNTER__, __VA_ARGS__)
#define simd_prefix_inclusive_sum(...) _zsim_simd_prefix_inclusive_sum(__COUNTER__, __VA_ARGS__)
#define simd_prefix_exclusive_sum(...) _zsim_simd_prefix_exclusive_sum(__COUNTER__, __VA_ARGS__)
#define simd_prefix_inclusive_product(...) _zsim_simd_prefix_inclusive_product(__COUNTER__, __VA_ARGS__)
#define simd_prefix_exclusive_product(...) _zsim_simd_prefix_exclusive_product(__COUNTER__, __VA_ARGS__)
#define simd_shuffle(...) _zsim_simd_shuffle(__COUNTER__, __VA_ARGS__)
#define simd_shuffle_xor(...) _zsim_simd_shuffle_xor(__COUNTER__, __VA_ARGS__)
#define simd_shuffle_up(...) _zsim_simd_shuffle_up(__COUNTER__, __VA_ARGS__)
#define simd_shuffle_down(...) _zsim_simd_shuffle_down(__COUNTER__, __VA_ARGS__)
#define simd_shuffle_rotate_up(...) _zsim_simd_shuffle_rotate_up(__COUNTER__, __VA_ARGS__)
#define simd_shuffle_rotate_down(...) _zsim_simd_shuffle_rotate_down(__COUNTER__, __VA_ARGS__)
#define simd_broadcast(...) _zsim_simd_broadcast(__COUNTER__, __VA_ARGS__)
#define simd_broadcast_first(...) _zsim_simd_broadcast_first(__COUNTER__, __VA_ARGS__)
#define simd_all(...) _zsim_simd_all(__COUNTER__, __VA_ARGS__)
#define simd_any(...) _zsim_simd_any(__COUNTER__, __VA_ARGS__)
#define simd_ballot(...) _zsim_simd_ballot(__COUNTER__, __VA_ARGS__)
#define simd_active_threads_mask() _zsim_simd_active_threads_mask(__COUNTER__)
#define simd_is_first() _zsim_simd_is_first(__COUNTER__)

// ---- atomics (fibers never preempt each other, so plain read-modify-write is atomic here)
enum memory_order { memory_order_relaxed };
template <typename T> struct atomic { T v; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
template <typename T> inline T atomic_load_explicit(atomic<T>* a, memory_order) { return a->v; }
template <typename T, typename U> inline void atomic_store_explicit(atomic<T>* a, U x, memory_order) { a->v = T(x); }
#define ZSIM_ATOMIC_RMW(NAME, EXPR)                                                      \
  template <typename T, typename U> inline T NAME(atomic<T>* a, U x, memory_order) {     \
    T old = a->v; T y = T(x); a->v = EXPR; return old; }
ZSIM_ATOMIC_RMW(atomic_fetch_add_explicit, T(old + y)) ZSIM_ATOMIC_RMW(atomic_fetch_sub_explicit, T(old - y))
ZSIM_ATOMIC_RMW(atomic_fetch_max_explicit, max(old, y)) ZSIM_ATOMIC_RMW(atomic_fetch_min_explicit, min(old, y))
ZSIM_ATOMIC_RMW(atomic_fetch_and_explicit, T(old & y)) ZSIM_ATOMIC_RMW(atomic_fetch_or_explicit, T(old | y))
ZSIM_ATOMIC_RMW(atomic_fetch_xor_explicit, T(old ^ y)) ZSIM_ATOMIC_RMW(atomic_exchange_explicit, y)
template <typename T, typename U>
inline bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, U desired, memory_order, memory_order) {
  if (a->v == *expected) { a->v = T(desired); return true; }
  *expected = a->v;
  return false;
}

}  // namespace metal

// What MLX's utils.h (prepended to every custom kernel on a Mac) provides that kernels commonly use.
using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;

// Metal has no double; unsuffixed literals are float (-fsingle-precision-constant).
#define double zsim_double_is_not_supported_in_metal
