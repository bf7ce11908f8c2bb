// The inner loop of every CPU SSD pass: a rank-1 recurrence over a tile of state rows that stays
// in registers for a block of time steps, with one reduction over the rows per step.
//
// A pass keeps a (rows x kTileLanes) slice of a (P x N) state matrix, "rows" being one of the two
// dimensions and the lanes a 16-wide block of the other. Per time step i it does
//
//     tile *= pre[i]                    only where pre[i] != 1 (a rescaling restart, ssd_steps.h)
//     tile[r] += U[r][i] * V[i]         rank-1 update: row coefficients times the lane vector
//     acc[i]  += sum_r R[r][i] * tile[r]   reduction over the rows, into a lanes vector
//
// The forward and the backward's state pass are this loop with different operands; the
// backward's G pass adds a second reduction and walks backwards (scan_tile_dual). U and R are
// (rows x steps) matrices in one of two layouts: "row-major" (element (r, i) at r * ld + i: a
// register block of rows reads contiguous streams; the forward's rows are n, and B and C are
// re-laid out once per group) or "step-major" (element (r, i) at i * ld + r: blocks of x and gy
// copied as they are, the backward's rows are p). V and acc are (steps x kTileLanes).
#pragma once

#include <cstdint>
#include <type_traits>

#include "vec.h"

namespace mblm::cpu_ssd {
inline namespace MBLM_CPU_ISA {

// Lanes of a tile row: two AVX2 float vectors (four double vectors), one AVX-512 float vector.
#ifndef MBLM_SSD_TL
#define MBLM_SSD_TL (MBLM_CPU_AVX512 ? 32 : 16)
#endif
constexpr int64_t kTileLanes = MBLM_SSD_TL;

using cpu::Vec;

#if MBLM_CPU_AVX512
// The lane sums of eight vectors, added to out[0..7]: halves added, then a tree of hadds.
inline void add_lane_sums8(const Vec<float>* v, float* out) {
  __m256 h[8];
  for (int r = 0; r < 8; ++r) {
    h[r] = _mm256_add_ps(_mm512_castps512_ps256(v[r].v),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[r].v), 1)));
  }
  const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
  // 128-bit halves: (rows 0-3 | rows 0-3) and (rows 4-7 | rows 4-7), partial sums of each
  const __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                 _mm256_permute2f128_ps(h0123, h4567, 0x31));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), s));
}
#elif MBLM_CPU_AVX2
// The lane sums of four vectors, added to out[0..3].
inline void add_lane_sums4(const Vec<float> (&v)[4], float* out) {
  const __m256 h01 = _mm256_hadd_ps(v[0].v, v[1].v);
  const __m256 h23 = _mm256_hadd_ps(v[2].v, v[3].v);
  const __m256 h = _mm256_hadd_ps(h01, h23);
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), s));
}
#endif

// The lane sums of kRows vectors, added to out[0..kRows).
template <typename T, int kRows>
inline void add_lane_sums(const Vec<T> (&v)[kRows], T* out) {
#if MBLM_CPU_AVX512
  if constexpr (std::is_same_v<T, float> && kRows % 8 == 0) {
    for (int r = 0; r < kRows; r += 8) add_lane_sums8(v + r, out + r);
    return;
  }
#elif MBLM_CPU_AVX2
  if constexpr (std::is_same_v<T, float> && kRows == 4) {
    add_lane_sums4(v, out);
    return;
  }
#endif
  for (int r = 0; r < kRows; ++r) {
    T lanes[Vec<T>::kWidth];
    v[r].store(lanes);
    T sum = 0;
    for (int i = 0; i < Vec<T>::kWidth; ++i) sum += lanes[i];
    out[r] += sum;
  }
}

// Operands of one pass over one block of steps (pointers to the block's first step).
template <typename T>
struct TileOperands {
  const T* U;   // rows x steps: update coefficient of row r at step i
  int64_t ldu;  // stride of the major dimension (see the layouts above)
  const T* V;   // steps x kTileLanes, row stride ldv: the update's lane vector at step i
  int64_t ldv;
  const T* R;  // rows x steps: reduction coefficient of row r at step i
  int64_t ldr;
  const T* pre;  // steps: rescaling factor applied before step i (1 = none)
  T* acc;        // steps x kTileLanes: the reductions, accumulated into
  int64_t steps;
};

// How a pass reads a block: which layout U and R have, and whether the reduction reads the tile
// before the step's update instead of after it (the backward's log-decay terms, ssd_bwd.cpp).
struct ScanOrder {
  bool step_major = false;
  bool reduce_first = false;
};

// kRows rows of the tile (row stride kTileLanes) through every step of the block.
template <typename T, int kRows, ScanOrder kOrder>
inline void scan_rows(T* tile, const T* U, const T* R, const TileOperands<T>& op) {
  const int64_t u_row = kOrder.step_major ? 1 : op.ldu, u_step = kOrder.step_major ? op.ldu : 1;
  const int64_t r_row = kOrder.step_major ? 1 : op.ldr, r_step = kOrder.step_major ? op.ldr : 1;
  using V = Vec<T>;
  constexpr int K = kTileLanes / V::kWidth;
  V t[kRows][K];
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < K; ++k) t[r][k] = V::load(tile + r * kTileLanes + k * V::kWidth);
  auto reduce = [&](int64_t i) {
    T* a = op.acc + i * kTileLanes;
    V aa[K];
    for (int k = 0; k < K; ++k) aa[k] = V::load(a + k * V::kWidth);
    for (int r = 0; r < kRows; ++r) {
      const V c = V::broadcast(R[r * r_row + i * r_step]);
      for (int k = 0; k < K; ++k) aa[k] = fmadd(c, t[r][k], aa[k]);
    }
    for (int k = 0; k < K; ++k) aa[k].store(a + k * V::kWidth);
  };
  for (int64_t i = 0; i < op.steps; ++i) {
    const T pre = op.pre[i];
    if (pre != T(1)) {
      const V p = V::broadcast(pre);
      for (int r = 0; r < kRows; ++r)
        for (int k = 0; k < K; ++k) t[r][k] = t[r][k] * p;
    }
    if constexpr (kOrder.reduce_first) reduce(i);
    const T* v = op.V + i * op.ldv;
    V vv[K];
    for (int k = 0; k < K; ++k) vv[k] = V::load(v + k * V::kWidth);
    for (int r = 0; r < kRows; ++r) {
      const V u = V::broadcast(U[r * u_row + i * u_step]);
      for (int k = 0; k < K; ++k) t[r][k] = fmadd(u, vv[k], t[r][k]);
    }
    if constexpr (!kOrder.reduce_first) reduce(i);
  }
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < K; ++k) t[r][k].store(tile + r * kTileLanes + k * V::kWidth);
}

// Rows per register block: with 16 AVX2 registers, float keeps 4 rows x 2 vectors of state plus
// the lane vector, the accumulator and a broadcast; double needs 4 vectors per row. AVX-512 has
// 32 registers and one float vector per row (two double vectors).
#if MBLM_CPU_AVX512
#ifndef MBLM_SSD_RB_F
#define MBLM_SSD_RB_F 8
#endif
template <typename T>
constexpr int kRowBlock = sizeof(T) == 4 ? MBLM_SSD_RB_F : 4;
#else
template <typename T>
constexpr int kRowBlock = sizeof(T) == 4 ? 4 : 2;
#endif

// The whole tile (rows x kTileLanes, row-major) through one block of steps. op.acc must hold
// the values to accumulate into (zeros for a fresh block).
template <typename T, ScanOrder kOrder>
void scan_tile(T* tile, int64_t rows, const TileOperands<T>& op) {
  constexpr int RB = kRowBlock<T>;
  const int64_t u_row = kOrder.step_major ? 1 : op.ldu, r_row = kOrder.step_major ? 1 : op.ldr;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) {
    scan_rows<T, RB, kOrder>(tile + r * kTileLanes, op.U + r * u_row, op.R + r * r_row, op);
  }
  for (; r < rows; ++r) {
    scan_rows<T, 1, kOrder>(tile + r * kTileLanes, op.U + r * u_row, op.R + r * r_row, op);
  }
}

// The backward's G pass with both of its reductions in one walk (csrc/cpu/ssd_bwd.cpp): reverse,
// step-major U and R, the lanes reduction into acc after the update as scan_rows, and before the
// update also a reduction along the lanes, sum_j tile[r][j] W[i][j] (W: steps x kTileLanes with
// row stride ldw), kept as Vec<T>::kWidth partial sums per row: Q[i][r][l] += sum over j = l
// (mod kWidth) (Q: steps x rows x kWidth, step stride ldq), summed by the caller once every tile
// of the row has been through (lane_sums), not once per tile.
template <typename T>
struct DualOperands {
  TileOperands<T> op;
  const T* W;
  int64_t ldw;
  T* Q;
  int64_t ldq;
};

template <typename T, int kRows>
inline void scan_rows_dual(T* tile, const T* U, const T* R, T* Q, const DualOperands<T>& d) {
  const TileOperands<T>& op = d.op;
  using V = Vec<T>;
  constexpr int K = kTileLanes / V::kWidth;
  V t[kRows][K];
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < K; ++k) t[r][k] = V::load(tile + r * kTileLanes + k * V::kWidth);
  for (int64_t s = 0; s < op.steps; ++s) {
    const int64_t i = op.steps - 1 - s;
    const T pre = op.pre[i];
    if (pre != T(1)) {
      const V p = V::broadcast(pre);
      for (int r = 0; r < kRows; ++r)
        for (int k = 0; k < K; ++k) t[r][k] = t[r][k] * p;
    }
    {
      const T* w = d.W + i * d.ldw;
      V wv[K];
      for (int k = 0; k < K; ++k) wv[k] = V::load(w + k * V::kWidth);
      V rows[kRows];
      for (int r = 0; r < kRows; ++r) {
        rows[r] = t[r][0] * wv[0];
        for (int k = 1; k < K; ++k) rows[r] = fmadd(t[r][k], wv[k], rows[r]);
      }
      add_lane_sums<T, kRows>(rows, Q + i * d.ldq);
    }
    const T* v = op.V + i * op.ldv;
    V vv[K];
    for (int k = 0; k < K; ++k) vv[k] = V::load(v + k * V::kWidth);
    for (int r = 0; r < kRows; ++r) {
      const V u = V::broadcast(U[r + i * op.ldu]);
      for (int k = 0; k < K; ++k) t[r][k] = fmadd(u, vv[k], t[r][k]);
    }
    T* a = op.acc + i * kTileLanes;
    V aa[K];
    for (int k = 0; k < K; ++k) aa[k] = V::load(a + k * V::kWidth);
    for (int r = 0; r < kRows; ++r) {
      const V c = V::broadcast(R[r + i * op.ldr]);
      for (int k = 0; k < K; ++k) aa[k] = fmadd(c, t[r][k], aa[k]);
    }
    for (int k = 0; k < K; ++k) aa[k].store(a + k * V::kWidth);
  }
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < K; ++k) t[r][k].store(tile + r * kTileLanes + k * V::kWidth);
}

template <typename T>
void scan_tile_dual(T* tile, int64_t rows, const DualOperands<T>& d) {
  constexpr int RB = kRowBlock<T>;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) {
    scan_rows_dual<T, RB>(tile + r * kTileLanes, d.op.U + r, d.op.R + r, d.Q + r, d);
  }
  for (; r < rows; ++r) {
    scan_rows_dual<T, 1>(tile + r * kTileLanes, d.op.U + r, d.op.R + r, d.Q + r, d);
  }
}

}  // namespace MBLM_CPU_ISA
}  // namespace mblm::cpu_ssd
