// MSL scalar and vector types for the simulator: half and bfloat with Metal's rounding and promotion
// rules, vec<T, N>, numeric_limits, as_type. No system headers (kernels are compiled with -nostdinc).
#pragma once

typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

namespace metal {

template <bool B, typename T = void> struct enable_if {};
template <typename T> struct enable_if<true, T> { typedef T type; };
template <typename T> struct is_int { static constexpr bool value = false; };
#define ZSIM_INT(T) template <> struct is_int<T> { static constexpr bool value = true; };
ZSIM_INT(bool) ZSIM_INT(char) ZSIM_INT(signed char) ZSIM_INT(unsigned char) ZSIM_INT(short)
ZSIM_INT(unsigned short) ZSIM_INT(int) ZSIM_INT(unsigned int) ZSIM_INT(long) ZSIM_INT(unsigned long)
ZSIM_INT(long long) ZSIM_INT(unsigned long long)
#undef ZSIM_INT
#define ZSIM_IF_INT(I) typename enable_if<is_int<I>::value, int>::type = 0

template <typename To, typename From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  To r;
  __builtin_memcpy((void*)&r, (const void*)&x, sizeof(To));
  return r;
}

// IEEE binary16. Arithmetic on two halves is done in float and rounded once: exact IEEE half results
// for + - * / (float has more than 2*11+2 bits). half with float gives float; with an integer, half.
struct half {
  unsigned short bits;
  half() = default;
  half(const half&) = default;
  half(const volatile half& o) : bits(o.bits) {}  // reads through `constant` (volatile) pointers
  half& operator=(const half&) = default;
  half(float f) : bits(__builtin_bit_cast(unsigned short, (_Float16)f)) {}
  template <typename I, ZSIM_IF_INT(I)> half(I i) : half(float(i)) {}
  operator float() const { return (float)__builtin_bit_cast(_Float16, bits); }
};

// bfloat converts implicitly only to float; float, half and integers need an explicit conversion.
struct bfloat {
  unsigned short bits;
  bfloat() = default;
  bfloat(const bfloat&) = default;
  bfloat(const volatile bfloat& o) : bits(o.bits) {}
  bfloat& operator=(const bfloat&) = default;
  explicit bfloat(float f) {
    unsigned u = __builtin_bit_cast(unsigned, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) bits = (unsigned short)((u >> 16) | 0x40);  // quiet NaN
    else bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);       // round to nearest even
  }
  explicit bfloat(half h) : bfloat(float(h)) {}
  template <typename I, ZSIM_IF_INT(I)> explicit bfloat(I i) : bfloat(float(i)) {}
  operator float() const { return __builtin_bit_cast(float, (unsigned)bits << 16); }
};

#define ZSIM_LOWP_OPS(H)                                                                       \
  inline H operator-(H a) { return H(-float(a)); }                                            \
  ZSIM_LOWP_OP(H, +) ZSIM_LOWP_OP(H, -) ZSIM_LOWP_OP(H, *) ZSIM_LOWP_OP(H, /)                   \
  ZSIM_LOWP_CMP(H, <) ZSIM_LOWP_CMP(H, >) ZSIM_LOWP_CMP(H, <=) ZSIM_LOWP_CMP(H, >=)             \
  ZSIM_LOWP_CMP(H, ==) ZSIM_LOWP_CMP(H, !=)
#define ZSIM_LOWP_OP(H, OP)                                                                    \
  inline H operator OP(H a, H b) { return H(float(a) OP float(b)); }                          \
  inline float operator OP(H a, float b) { return float(a) OP b; }                            \
  inline float operator OP(float a, H b) { return a OP float(b); }                            \
  template <typename I, ZSIM_IF_INT(I)> inline H operator OP(H a, I b) { return H(float(a) OP float(b)); } \
  template <typename I, ZSIM_IF_INT(I)> inline H operator OP(I a, H b) { return H(float(a) OP float(b)); } \
  inline H& operator OP##=(H& a, H b) { return a = H(float(a) OP float(b)); }                 \
  inline H& operator OP##=(H& a, float b) { return a = H(float(a) OP b); }                    \
  template <typename I, ZSIM_IF_INT(I)> inline H& operator OP##=(H& a, I b) { return a = H(float(a) OP float(b)); }
#define ZSIM_LOWP_CMP(H, OP)                                                                   \
  inline bool operator OP(H a, H b) { return float(a) OP float(b); }                          \
  inline bool operator OP(H a, float b) { return float(a) OP b; }                             \
  inline bool operator OP(float a, H b) { return a OP float(b); }                             \
  template <typename I, ZSIM_IF_INT(I)> inline bool operator OP(H a, I b) { return float(a) OP float(b); } \
  template <typename I, ZSIM_IF_INT(I)> inline bool operator OP(I a, H b) { return float(a) OP float(b); }
ZSIM_LOWP_OPS(half)
ZSIM_LOWP_OPS(bfloat)
// Neither converts implicitly to the other in Metal.
#define ZSIM_NO_MIX(OP)                       \
  float operator OP(half, bfloat) = delete;   \
  float operator OP(bfloat, half) = delete;
ZSIM_NO_MIX(+) ZSIM_NO_MIX(-) ZSIM_NO_MIX(*) ZSIM_NO_MIX(/)

template <typename T> struct numeric_limits;
template <> struct numeric_limits<float> {
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
  static constexpr float max() { return 3.40282347e+38f; }
  static constexpr float lowest() { return -3.40282347e+38f; }
  static constexpr float min() { return 1.17549435e-38f; }
  static constexpr float epsilon() { return 1.19209290e-7f; }
};
template <> struct numeric_limits<half> {
  static half infinity() { return as_type<half>((unsigned short)0x7c00); }
  static half quiet_NaN() { return as_type<half>((unsigned short)0x7e00); }
  static half max() { return as_type<half>((unsigned short)0x7bff); }
  static half lowest() { return as_type<half>((unsigned short)0xfbff); }
  static half min() { return as_type<half>((unsigned short)0x0400); }
  static half epsilon() { return as_type<half>((unsigned short)0x1400); }
};
template <> struct numeric_limits<bfloat> {
  static bfloat infinity() { return as_type<bfloat>((unsigned short)0x7f80); }
  static bfloat quiet_NaN() { return as_type<bfloat>((unsigned short)0x7fc0); }
  static bfloat max() { return as_type<bfloat>((unsigned short)0x7f7f); }
  static bfloat lowest() { return as_type<bfloat>((unsigned short)0xff7f); }
  static bfloat min() { return as_type<bfloat>((unsigned short)0x0080); }
  static bfloat epsilon() { return as_type<bfloat>((unsigned short)0x3c00); }
};
#define ZSIM_INT_LIMITS(T, LO, HI)                         \
  template <> struct numeric_limits<T> {                   \
    static constexpr T max() { return HI; }                \
    static constexpr T min() { return LO; }                \
    static constexpr T lowest() { return LO; }             \
  };
ZSIM_INT_LIMITS(int, -2147483647 - 1, 2147483647)
ZSIM_INT_LIMITS(uint, 0u, 4294967295u)
ZSIM_INT_LIMITS(short, -32768, 32767)
ZSIM_INT_LIMITS(ushort, 0, 65535)
ZSIM_INT_LIMITS(char, -128, 127)
ZSIM_INT_LIMITS(uchar, 0, 255)
ZSIM_INT_LIMITS(long, -9223372036854775807L - 1, 9223372036854775807L)
ZSIM_INT_LIMITS(ulong, 0ul, 18446744073709551615ul)

// vec<T, N>: components x y z w (no swizzles), elementwise arithmetic, scalar broadcast.
template <typename T, int N> struct vec_storage;
template <typename T> struct vec_storage<T, 2> { T x, y; };
template <typename T> struct vec_storage<T, 3> { T x, y, z; };
template <typename T> struct vec_storage<T, 4> { T x, y, z, w; };

template <typename T, int N>
struct vec : vec_storage<T, N> {
  vec() = default;
  vec(const vec&) = default;
  vec& operator=(const vec&) = default;
  vec(const volatile vec& o) { for (int i = 0; i < N; i++) (*this)[i] = T(((const volatile T*)&o)[i]); }
  template <typename S> vec(S s) { for (int i = 0; i < N; i++) (*this)[i] = T(s); }  // broadcast
  template <typename A, typename B> vec(A a, B b) { init(0, a, b); }
  template <typename A, typename B, typename C> vec(A a, B b, C c) { init(0, a, b, c); }
  template <typename A, typename B, typename C, typename D> vec(A a, B b, C c, D d) { init(0, a, b, c, d); }
  template <typename U> explicit vec(vec<U, N> o) { for (int i = 0; i < N; i++) (*this)[i] = T(o[i]); }
  T& operator[](int i) { return (&this->x)[i]; }
  T operator[](int i) const { return (&this->x)[i]; }

 private:
  template <typename U, int M> void put(int& k, vec<U, M> v) { for (int i = 0; i < M; i++) (*this)[k++] = T(v[i]); }
  template <typename S> void put(int& k, S s) { (*this)[k++] = T(s); }
  void init(int) {}
  template <typename A, typename... R> void init(int k, A a, R... r) { put(k, a); init(k, r...); }
};

#define ZSIM_VEC_OP(OP)                                                                                 \
  template <typename T, int N> vec<T, N> operator OP(vec<T, N> a, vec<T, N> b) {                        \
    vec<T, N> r; for (int i = 0; i < N; i++) r[i] = T(a[i] OP b[i]); return r; }                        \
  template <typename T, int N, typename S> vec<T, N> operator OP(vec<T, N> a, S s) {                    \
    vec<T, N> r; for (int i = 0; i < N; i++) r[i] = T(a[i] OP T(s)); return r; }                        \
  template <typename T, int N, typename S> vec<T, N> operator OP(S s, vec<T, N> a) {                    \
    vec<T, N> r; for (int i = 0; i < N; i++) r[i] = T(T(s) OP a[i]); return r; }                        \
  template <typename T, int N, typename S> vec<T, N>& operator OP##=(vec<T, N>& a, S s) { return a = a OP s; }
ZSIM_VEC_OP(+) ZSIM_VEC_OP(-) ZSIM_VEC_OP(*) ZSIM_VEC_OP(/)
template <typename T, int N> vec<T, N> operator-(vec<T, N> a) { return T(0) - a; }

#define ZSIM_VEC_TYPES(T, NAME) typedef vec<T, 2> NAME##2; typedef vec<T, 3> NAME##3; typedef vec<T, 4> NAME##4;
ZSIM_VEC_TYPES(float, float) ZSIM_VEC_TYPES(half, half) ZSIM_VEC_TYPES(bfloat, bfloat)
ZSIM_VEC_TYPES(int, int) ZSIM_VEC_TYPES(uint, uint) ZSIM_VEC_TYPES(short, short)
ZSIM_VEC_TYPES(ushort, ushort) ZSIM_VEC_TYPES(char, char) ZSIM_VEC_TYPES(uchar, uchar)
ZSIM_VEC_TYPES(bool, bool) ZSIM_VEC_TYPES(long, long) ZSIM_VEC_TYPES(ulong, ulong)

}  // namespace metal
