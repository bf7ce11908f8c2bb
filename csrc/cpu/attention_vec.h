// Small SIMD helpers of the CPU attention kernels: a fixed-width vector type (AVX2+FMA when the
// build targets it, a plain array the compiler vectorizes otherwise), a vectorized exp, and the
// register-blocked GEMM micro-kernel that every product in attention (Q.K^T, P.V and the five
// products of the backward) goes through. The vector type, exp and the row conversions are also
// used by the norm, loss and GELU kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MBLM_ATTN_AVX2 1
#else
#define MBLM_ATTN_AVX2 0
#endif

namespace mblm::cpu_attn {

template <typename T>
struct Vec;

#if MBLM_ATTN_AVX2

template <>
struct Vec<float> {
  static constexpr int kWidth = 8;
  __m256 v;

  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec iota() { return {_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7)}; }
  // Lanes where idx >= thr take b, the others a.
  friend Vec select_ge(Vec idx, Vec thr, Vec a, Vec b) {
    return {_mm256_blendv_ps(a.v, b.v, _mm256_cmp_ps(idx.v, thr.v, _CMP_GE_OQ))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  friend Vec abs(Vec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float hmax() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // exp with ~1 ulp error (Cephes expf): x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6
  // polynomial, 2^n through the exponent bits. exp(-inf) and anything below the float range
  // gives 0; NaN stays NaN (max/min return their second operand when one is NaN).
  Vec exp() const {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f);
    const __m256 lo = _mm256_set1_ps(-87.3365447504f);
    __m256 x = _mm256_min_ps(hi, v);
    x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
    e = _mm256_slli_epi32(e, 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    // Below ~-87.3 the exponent trick underflows into garbage: flush those lanes to 0.
    return {_mm256_andnot_ps(_mm256_cmp_ps(v, lo, _CMP_LT_OQ), y)};
  }
};

template <>
struct Vec<double> {
  static constexpr int kWidth = 4;
  __m256d v;

  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static Vec broadcast(double x) { return {_mm256_set1_pd(x)}; }
  static Vec zero() { return {_mm256_setzero_pd()}; }
  static Vec iota() { return {_mm256_setr_pd(0, 1, 2, 3)}; }
  friend Vec select_ge(Vec idx, Vec thr, Vec a, Vec b) {
    return {_mm256_blendv_pd(a.v, b.v, _mm256_cmp_pd(idx.v, thr.v, _CMP_GE_OQ))};
  }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_pd(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_pd(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_pd(a.v, b.v)}; }
  friend Vec max(Vec a, Vec b) { return {_mm256_max_pd(a.v, b.v)}; }
  double sum() const {
    alignas(32) double t[4];
    store(t);
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
  double hmax() const {
    alignas(32) double t[4];
    store(t);
    return std::fmax(std::fmax(t[0], t[1]), std::fmax(t[2], t[3]));
  }
  // float64 is the gradcheck / reference dtype, not a fast path: exact libm exp.
  Vec exp() const {
    alignas(32) double t[4];
    store(t);
    for (double& x : t) x = std::exp(x);
    return load(t);
  }
};

#else  // portable fallback: fixed-size arrays with loops the compiler vectorizes

template <typename T>
struct Vec {
  static constexpr int kWidth = 32 / sizeof(T);
  T v[kWidth];

  static Vec load(const T* p) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = p[i];
    return r;
  }
  static Vec broadcast(T x) {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = x;
    return r;
  }
  static Vec zero() { return broadcast(T(0)); }
  static Vec iota() {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = T(i);
    return r;
  }
  friend Vec select_ge(Vec idx, Vec thr, Vec a, Vec b) {
    for (int i = 0; i < kWidth; ++i) a.v[i] = idx.v[i] >= thr.v[i] ? b.v[i] : a.v[i];
    return a;
  }
  void store(T* p) const {
    for (int i = 0; i < kWidth; ++i) p[i] = v[i];
  }
  friend Vec fmadd(Vec a, Vec b, Vec c) {
    for (int i = 0; i < kWidth; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  friend Vec operator+(Vec a, Vec b) {
    for (int i = 0; i < kWidth; ++i) a.v[i] += b.v[i];
    return a;
  }
  friend Vec operator-(Vec a, Vec b) {
    for (int i = 0; i < kWidth; ++i) a.v[i] -= b.v[i];
    return a;
  }
  friend Vec operator*(Vec a, Vec b) {
    for (int i = 0; i < kWidth; ++i) a.v[i] *= b.v[i];
    return a;
  }
  friend Vec max(Vec a, Vec b) {
    for (int i = 0; i < kWidth; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  T sum() const {
    T s = 0;
    for (int i = 0; i < kWidth; ++i) s += v[i];
    return s;
  }
  T hmax() const {
    T m = v[0];
    for (int i = 1; i < kWidth; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  Vec exp() const {
    Vec r;
    for (int i = 0; i < kWidth; ++i) r.v[i] = std::exp(v[i]);
    return r;
  }
};

#endif

// One MR x (NV * width) tile of C (+)= A . B over k in [k0, k1). A's element (i, k) is
// a[i * a_rs + k * a_cs] (so A^T is read by swapping the strides, with no transpose copy); B's
// rows are contiguous with leading dimension ldb; C's rows have leading dimension ldc.
template <typename T, int MR, int NV>
inline void gemm_tile(int64_t k0, int64_t k1, const T* a, int64_t a_rs, int64_t a_cs, const T* b,
                      int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  using V = Vec<T>;
  constexpr int W = V::kWidth;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NV; ++j) {
      acc[r][j] = accumulate ? V::load(c + r * ldc + j * W) : V::zero();
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = V::load(b + k * ldb + j * W);
    for (int r = 0; r < MR; ++r) {
      const V av = V::broadcast(a[r * a_rs + k * a_cs]);
      for (int j = 0; j < NV; ++j) acc[r][j] = fmadd(av, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NV; ++j) acc[r][j].store(c + r * ldc + j * W);
  }
}

template <typename T, int NV>
inline void gemm_tile_rows(int64_t rows, int64_t k0, int64_t k1, const T* a, int64_t a_rs,
                           int64_t a_cs, const T* b, int64_t ldb, T* c, int64_t ldc,
                           bool accumulate) {
  switch (rows) {
    case 4:
      gemm_tile<T, 4, NV>(k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
      break;
    case 3:
      gemm_tile<T, 3, NV>(k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
      break;
    case 2:
      gemm_tile<T, 2, NV>(k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
      break;
    default:
      gemm_tile<T, 1, NV>(k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
      break;
  }
}

// Which part of a product a causal mask leaves nonzero, for a block whose rows and columns are
// offset by `diag` (key index j is visible from query index i iff j <= i + diag):
enum class Tri {
  kNone,    // everything
  kNUpper,  // rows = queries, output columns = keys (scores): columns j <= i + diag
  kKUpper,  // rows = queries, reduction index = keys (P.V, dS.K): k <= i + diag
  kKLower,  // rows = keys, reduction index = queries (P^T.dO, dS^T.Q): k >= i - diag
};

// C[m x n] (+)= A[m x kdim] . B[kdim x n], n a multiple of the vector width (callers pad B and C
// with zero columns). Panels of B two vectors wide stay in L1 while the rows of A stream past, in
// tiles of 4 rows. With a Tri mode, work that the causal mask zeroes is skipped; entries of C
// the mask hides may then be left unwritten (kNUpper), so callers mask them afterwards.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_rs, int64_t a_cs, const T* b,
          int64_t ldb, T* c, int64_t ldc, bool accumulate, Tri tri = Tri::kNone, int64_t diag = 0) {
  constexpr int W = Vec<T>::kWidth;
  constexpr int MR = 4;
  for (int64_t j = 0; j < n;) {
    const bool two = j + 2 * W <= n;
    for (int64_t i = 0; i < m; i += MR) {
      const int64_t rows = std::min<int64_t>(MR, m - i);
      int64_t k0 = 0, k1 = kdim;
      if (tri == Tri::kNUpper) {
        if (j > i + rows - 1 + diag) continue;  // the whole panel is masked for these rows
      } else if (tri == Tri::kKUpper) {
        k1 = std::clamp<int64_t>(i + rows + diag, 0, kdim);
      } else if (tri == Tri::kKLower) {
        k0 = std::clamp<int64_t>(i - diag, 0, kdim);
      }
      if (two) {
        gemm_tile_rows<T, 2>(rows, k0, k1, a + i * a_rs, a_rs, a_cs, b + j, ldb, c + i * ldc + j,
                             ldc, accumulate);
      } else {
        gemm_tile_rows<T, 1>(rows, k0, k1, a + i * a_rs, a_rs, a_cs, b + j, ldb, c + i * ldc + j,
                             ldc, accumulate);
      }
    }
    j += two ? 2 * W : W;
  }
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (an out-of-place transpose).
template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

#if MBLM_ATTN_AVX2
template <>
inline void transpose<float>(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                             int64_t ldd) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      const float* s = src + r * lds + c;
      __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lds),
             r2 = _mm256_loadu_ps(s + 2 * lds), r3 = _mm256_loadu_ps(s + 3 * lds),
             r4 = _mm256_loadu_ps(s + 4 * lds), r5 = _mm256_loadu_ps(s + 5 * lds),
             r6 = _mm256_loadu_ps(s + 6 * lds), r7 = _mm256_loadu_ps(s + 7 * lds);
      __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
             t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
             t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
             t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
             u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
             u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
             u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = dst + c * ldd + r;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (; c < cols; ++c) {
      for (int64_t rr = r; rr < r + 8; ++rr) dst[c * ldd + rr] = src[rr * lds + c];
    }
  }
  for (; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}
#endif

// Copies bytes from src to dst; with `stream`, through non-temporal stores where dst is 32-byte
// aligned (outputs far larger than the caches: no read-for-ownership of lines that are fully
// overwritten). Callers issue store_fence() before the written data is read by another thread.
inline void copy_out(void* dst, const void* src, int64_t bytes, bool stream) {
#if MBLM_ATTN_AVX2
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    int64_t i = 0;
    for (; i + 32 <= bytes; i += 32) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    }
    if (i < bytes) std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void store_fence() {
#if MBLM_ATTN_AVX2
  _mm_sfence();
#endif
}

// Asks for the cache lines of [p, p + bytes) ahead of their use.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// Conversions between the storage type S of a row and the accumulation type A: dst[i] = A(src[i])
// and dst[i] = S(src[i]) (round to nearest even, as c10's conversions), n elements.
template <typename S, typename A>
inline void cvt_load(const S* src, A* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i]);
}

template <typename S, typename A>
inline void cvt_store(const A* src, S* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
}

#if MBLM_ATTN_AVX2
template <>
inline void cvt_load<c10::BFloat16, float>(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void cvt_store<c10::BFloat16, float>(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff),
                qnan = _mm256_set1_epi32(0x7fc0);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, bias)), 16);
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

#if defined(__F16C__)
template <>
inline void cvt_load<c10::Half, float>(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void cvt_store<c10::Half, float>(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#endif
#endif

}  // namespace mblm::cpu_attn
