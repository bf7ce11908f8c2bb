// The fixed-width SIMD vector every CPU kernel computes with: AVX2+FMA for float32 and float64
// when the build targets it (x86-64-v3, the default), a plain array the compiler vectorizes
// otherwise. Beyond arithmetic it has the transcendental functions the kernels need: exp
// (attention softmax, SSD decays), softplus and its derivative (the scan's delta) and sigmoid.
// float32 uses ~1 ulp polynomial approximations; float64 (the gradcheck / reference dtype) calls
// libm so that it stays exact.
//
// A translation unit built for AVX-512 (the SSD kernels' second copy, CMakeLists.txt) gets 16
// float / 8 double lanes instead. Everything here lives in an inline namespace named after the
// instruction set (MBLM_CPU_ISA: avx512, avx2 or portable), so that copies of the same inline
// function compiled for different instruction sets are different symbols.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MBLM_CPU_AVX2 1  // AVX2 + FMA instructions (also true in an AVX-512 build)
#else
#define MBLM_CPU_AVX2 0
#endif
#if MBLM_CPU_AVX2 && defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__)
#define MBLM_CPU_AVX512 1  // Vec is the 512-bit one
#define MBLM_CPU_ISA avx512
#elif MBLM_CPU_AVX2
#define MBLM_CPU_AVX512 0
#define MBLM_CPU_ISA avx2
#else
#define MBLM_CPU_AVX512 0
#define MBLM_CPU_ISA portable
#endif

namespace mblm::cpu {
inline namespace MBLM_CPU_ISA {

// Element-wise libm functions shared by every Vec specialisation that has no SIMD version.
template <typename T>
struct ScalarMath {
  static T exp(T x) { return std::exp(x); }
  // torch.nn.functional.softplus (beta 1, threshold 20): x > 20 ? x : log1p(exp(x)).
  static T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }
  // d softplus / dx as torch computes it: x > 20 ? 1 : exp(x) / (exp(x) + 1).
  static T softplus_grad(T x) {
    const T e = std::exp(x);
    return x > T(20) ? T(1) : e / (e + T(1));
  }
  static T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
};

// The element-wise functions of a vector type V whose lanes are reachable through store/load.
#define MBLM_VEC_SCALAR_FN(name)                                     \
  Vec name() const {                                                 \
    alignas(64) Scalar t[kWidth];                                    \
    store(t);                                                        \
    for (int i = 0; i < kWidth; ++i) t[i] = ScalarMath<Scalar>::name(t[i]); \
    return load(t);                                                  \
  }

template <typename T>
struct Vec;

#if MBLM_CPU_AVX512

// One zmm register per vector. The transcendental functions go through libm lane by lane: no
// kernel built for AVX-512 (only the SSD scan) calls them.
template <>
struct Vec<float> {
  using Scalar = float;
  static constexpr int kWidth = 16;
  __m512 v;

  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec iota() {
    return {_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)};
  }
  // Lanes where idx >= thr take b, the others a.
  friend Vec select_ge(Vec idx, Vec thr, Vec a, Vec b) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(idx.v, thr.v, _CMP_GE_OQ), a.v, b.v)};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
  friend Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  friend Vec abs(Vec a) { return {_mm512_abs_ps(a.v)}; }
  float sum() const { return _mm512_reduce_add_ps(v); }
  float hmax() const { return _mm512_reduce_max_ps(v); }
  MBLM_VEC_SCALAR_FN(exp)
  MBLM_VEC_SCALAR_FN(softplus)
  MBLM_VEC_SCALAR_FN(softplus_grad)
  MBLM_VEC_SCALAR_FN(sigmoid)
};

template <>
struct Vec<double> {
  using Scalar = double;
  static constexpr int kWidth = 8;
  __m512d v;

  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static Vec broadcast(double x) { return {_mm512_set1_pd(x)}; }
  static Vec zero() { return {_mm512_setzero_pd()}; }
  static Vec iota() { return {_mm512_setr_pd(0, 1, 2, 3, 4, 5, 6, 7)}; }
  friend Vec select_ge(Vec idx, Vec thr, Vec a, Vec b) {
    return {_mm512_mask_blend_pd(_mm512_cmp_pd_mask(idx.v, thr.v, _CMP_GE_OQ), a.v, b.v)};
  }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_pd(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_pd(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_pd(a.v, b.v)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm512_div_pd(a.v, b.v)}; }
  friend Vec max(Vec a, Vec b) { return {_mm512_max_pd(a.v, b.v)}; }
  friend Vec abs(Vec a) { return {_mm512_abs_pd(a.v)}; }
  double sum() const { return _mm512_reduce_add_pd(v); }
  double hmax() const { return _mm512_reduce_max_pd(v); }
  MBLM_VEC_SCALAR_FN(exp)
  MBLM_VEC_SCALAR_FN(softplus)
  MBLM_VEC_SCALAR_FN(softplus_grad)
  MBLM_VEC_SCALAR_FN(sigmoid)
};

#elif MBLM_CPU_AVX2

template <>
struct Vec<float> {
  using Scalar = float;
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

  // exp with ~1 ulp error (the Cephes expf scheme): x = k ln2 + r with |r| <= ln2 / 2 (ln2 split
  // in two parts so that r is exact), exp(r) by a degree-6 polynomial, 2^k through the exponent
  // bits. Inputs below ~-87.3 give 0 (also -inf), above ~88.4 a large finite value; NaN stays
  // NaN (min/max pass their second operand through when it is NaN).
  Vec exp() const {
    __m256 x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), v);
    x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
    // Below ~-87.3 the exponent field underflows: flush those lanes to 0.
    const __m256 tiny = _mm256_cmp_ps(v, _mm256_set1_ps(-87.3365447504f), _CMP_LT_OQ);
    return {_mm256_andnot_ps(tiny, p)};
  }

  // Natural log for x in [1, 2] (all softplus needs), ~1 ulp: x = 2^e m with m in
  // [sqrt(1/2), sqrt(2)), log(m) = f - f^2/2 + f^3 P(f) with f = m - 1 (Cephes logf's
  // polynomial), plus e ln2 split in two parts.
  static __m256 log_1_2(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256i bits = _mm256_castps_si256(x);
    __m256 e =
        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
    // Mantissa in [0.5, 1).
    const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
    const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    // m < sqrt(1/2): use 2m - 1 and e - 1; else m - 1.
    e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
    const __m256 f = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(small, m));
    const __m256 f2 = _mm256_mul_ps(f, f);
    __m256 p = _mm256_set1_ps(7.0376836292e-2f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.1514610310e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), f2);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(f2, _mm256_set1_ps(0.5f), y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
  }

  // softplus(x) = max(x, 0) + log1p(exp(-|x|)), and x itself above torch's threshold 20.
  // log1p(t) for t in (0, 1] as log(1 + t) * t / ((1 + t) - 1), exact to rounding for tiny t.
  Vec softplus() const {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 t = Vec{_mm256_sub_ps(_mm256_setzero_ps(), abs(*this).v)}.exp().v;
    const __m256 w = _mm256_add_ps(one, t);
    const __m256 d = _mm256_sub_ps(w, one);
    const __m256 exact = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ);
    const __m256 lp = _mm256_blendv_ps(_mm256_div_ps(_mm256_mul_ps(log_1_2(w), t), d), t, exact);
    const __m256 sp = _mm256_add_ps(_mm256_max_ps(v, _mm256_setzero_ps()), lp);
    return {_mm256_blendv_ps(sp, v, _mm256_cmp_ps(v, _mm256_set1_ps(20.0f), _CMP_GT_OQ))};
  }
  Vec sigmoid() const {
    const __m256 one = _mm256_set1_ps(1.0f);
    return {
        _mm256_div_ps(one, _mm256_add_ps(one, Vec{_mm256_sub_ps(_mm256_setzero_ps(), v)}.exp().v))};
  }
  Vec softplus_grad() const {
    return {_mm256_blendv_ps(sigmoid().v, _mm256_set1_ps(1.0f),
                             _mm256_cmp_ps(v, _mm256_set1_ps(20.0f), _CMP_GT_OQ))};
  }
};

template <>
struct Vec<double> {
  using Scalar = double;
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
  friend Vec operator/(Vec a, Vec b) { return {_mm256_div_pd(a.v, b.v)}; }
  friend Vec max(Vec a, Vec b) { return {_mm256_max_pd(a.v, b.v)}; }
  friend Vec abs(Vec a) { return {_mm256_andnot_pd(_mm256_set1_pd(-0.0), a.v)}; }
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
  MBLM_VEC_SCALAR_FN(exp)
  MBLM_VEC_SCALAR_FN(softplus)
  MBLM_VEC_SCALAR_FN(softplus_grad)
  MBLM_VEC_SCALAR_FN(sigmoid)
};

#else  // portable fallback: fixed-size arrays with loops the compiler vectorizes

template <typename T>
struct Vec {
  using Scalar = T;
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
  friend Vec operator/(Vec a, Vec b) {
    for (int i = 0; i < kWidth; ++i) a.v[i] /= b.v[i];
    return a;
  }
  friend Vec max(Vec a, Vec b) {
    for (int i = 0; i < kWidth; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  friend Vec abs(Vec a) {
    for (int i = 0; i < kWidth; ++i) a.v[i] = std::fabs(a.v[i]);
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
  MBLM_VEC_SCALAR_FN(exp)
  MBLM_VEC_SCALAR_FN(softplus)
  MBLM_VEC_SCALAR_FN(softplus_grad)
  MBLM_VEC_SCALAR_FN(sigmoid)
};

#endif

#undef MBLM_VEC_SCALAR_FN

}  // namespace MBLM_CPU_ISA
}  // namespace mblm::cpu
