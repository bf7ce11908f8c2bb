// Small SIMD helpers of the CPU attention kernels (on the shared vector type of vec.h): the
// register-blocked GEMM micro-kernel that every product in attention (Q.K^T, P.V and the five
// products of the backward) goes through, transposes, streaming copies and the row conversions
// (bf16/fp16 <-> float32) that the norm, loss and GELU kernels also use.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "vec.h"


namespace mblm::cpu_attn {

using cpu::Vec;

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

#if MBLM_CPU_AVX2
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
#if MBLM_CPU_AVX2
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
#if MBLM_CPU_AVX2
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

#if MBLM_CPU_AVX2
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
