// Shapes, operand layouts and work splits of the CPU SSD scan (csrc/cpu/ssd_fwd.cpp,
// csrc/cpu/ssd_bwd.cpp).
//
// Every pass walks time in blocks of kStepBlock steps in its outer loop and the heads (and tiles)
// of its task inside: the rows of x, gy, y and gx are H * P (or the model's conv_dim) elements
// apart, a page or more, so a block touches each page once for all the heads a task owns rather
// than once per head, and the next block's rows are prefetched by software (the hardware
// prefetchers do not cross pages).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "mblm/ssd.h"
#include "ssd_steps.h"
#include "ssd_tile.h"

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define MBLM_SSD_MXCSR 1
#else
#define MBLM_SSD_MXCSR 0
#endif

namespace mblm::cpu_ssd {
inline namespace MBLM_CPU_ISA {

// Steps per block of the tile loop: a tile's operands for a block (rows x 64 coefficients,
// 64 x 16 lanes) stay in L1/L2 and the tile goes through memory once per block.
constexpr int64_t kStepBlock = 64;
static_assert(kSsdCheckpointSteps % kStepBlock == 0, "checkpoint blocks are whole step blocks");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Flushes subnormal floats to zero on this thread while in scope (x86 FTZ and DAZ), restoring the
// previous mode after. A strongly decaying head drives the state below the normal range
// (exp(d A) of 1e-40 in one step, or long runs of zero input), and arithmetic on subnormals
// is two orders of magnitude slower; the values lost are below 1e-38 (float32) / 1e-308.
class FlushSubnormals {
 public:
  FlushSubnormals() {
#if MBLM_SSD_MXCSR
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#endif
  }
  ~FlushSubnormals() {
#if MBLM_SSD_MXCSR
    _mm_setcsr(saved_);
#endif
  }
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;

 private:
  unsigned saved_ = 0;
};

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// A (B, L, X, Y) tensor with a contiguous last dim, read by element.
template <typename T>
struct Strided4 {
  const T* p;
  int64_t s0, s1, s2;
  explicit Strided4(const at::Tensor& t)
      : p(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  const T* row(int64_t b, int64_t t, int64_t i) const { return p + b * s0 + t * s1 + i * s2; }
};

struct Dims {
  int64_t batch, length, heads, headdim, groups, dstate;
  int64_t per_group;  // heads per group
  int64_t blocks;     // step blocks: ceil(L / kStepBlock)
  int64_t chunks;     // checkpoint blocks: ceil(L / kSsdCheckpointSteps)
  int64_t p_tiles, n_tiles;

  Dims(const at::Tensor& x, const at::Tensor& B)
      : batch(x.size(0)),
        length(x.size(1)),
        heads(x.size(2)),
        headdim(x.size(3)),
        groups(B.size(2)),
        dstate(B.size(3)),
        per_group(groups > 0 ? heads / groups : 0),
        blocks(ceil_div(length, kStepBlock)),
        chunks(ssd_num_checkpoints(length)),
        p_tiles(ceil_div(headdim, kTileLanes)),
        n_tiles(ceil_div(dstate, kTileLanes)) {}

  int64_t block_steps(int64_t blk) const { return std::min(kStepBlock, length - blk * kStepBlock); }
};

// Per-head parameters in the compute dtype, contiguous.
template <typename acc_t>
struct HeadParams {
  at::Tensor dt, A, D, dt_bias;  // D: (H, P), expanded from (H,); undefined when absent
  HeadParams(const at::Tensor& dt_in, const at::Tensor& A_in, const std::optional<at::Tensor>& D_in,
             const std::optional<at::Tensor>& bias_in, int64_t heads, int64_t headdim) {
    const auto cdt = c10::CppTypeToScalarType<acc_t>::value;
    dt = dt_in.to(cdt).contiguous();
    A = A_in.to(cdt).contiguous();
    if (D_in.has_value()) {
      at::Tensor d = D_in->to(cdt);
      D = (d.dim() == 1 ? d.view({heads, 1}).expand({heads, headdim}) : d).contiguous();
    }
    if (bias_in.has_value()) dt_bias = bias_in->to(cdt).contiguous();
  }
  const acc_t* D_ptr() const { return D.defined() ? D.template const_data_ptr<acc_t>() : nullptr; }
  const acc_t* bias_ptr() const {
    return dt_bias.defined() ? dt_bias.template const_data_ptr<acc_t>() : nullptr;
  }
};

// Step tables (ssd_steps.h) for all (b, h), in one tensor.
template <typename acc_t>
struct Tables {
  at::Tensor storage;
  StepTables<acc_t> t;
  Tables(const Dims& dm, const HeadParams<acc_t>& hp, bool softplus_dt, bool reverse,
         const at::TensorOptions& opts) {
    const int64_t n = dm.batch * dm.heads * dm.length;
    storage = at::empty({reverse ? 8 : 5, n}, opts);
    acc_t* p = storage.template data_ptr<acc_t>();
    t.d = p, t.a = p + n, t.pre = p + 2 * n, t.wsc = p + 3 * n, t.osc = p + 4 * n;
    if (reverse) t.rpre = p + 5 * n, t.gsc = p + 6 * n, t.rosc = p + 7 * n;
    compute_step_tables<acc_t>(t, hp.dt.template const_data_ptr<acc_t>(),
                               hp.A.template const_data_ptr<acc_t>(), hp.bias_ptr(), softplus_dt,
                               dm.batch, dm.length, dm.heads, reverse);
  }
};

// B or C in the compute dtype laid out (B, G, blocks, N, kStepBlock), zero steps beyond L: the
// row coefficients of an (n x p) pass, contiguous in time, shared by every head of a group.
template <typename acc_t>
struct GroupOperand {
  at::Tensor blocked;
  const acc_t* blk(const Dims& dm, int64_t b, int64_t g, int64_t blk) const {
    return blocked.template const_data_ptr<acc_t>() +
           ((b * dm.groups + g) * dm.blocks + blk) * dm.dstate * kStepBlock;
  }
};

template <typename scalar_t, typename acc_t>
GroupOperand<acc_t> prepare_group_operand(const at::Tensor& src, const Dims& dm,
                                          const at::TensorOptions& opts) {
  GroupOperand<acc_t> out;
  out.blocked = at::empty({dm.batch, dm.groups, dm.blocks, dm.dstate, kStepBlock}, opts);
  const Strided4<scalar_t> in(src);
  acc_t* base = out.blocked.template data_ptr<acc_t>();
  at::parallel_for(0, dm.batch * dm.groups * dm.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t blk = u % dm.blocks, bg = u / dm.blocks;
      const int64_t b = bg / dm.groups, g = bg % dm.groups;
      const int64_t t0 = blk * kStepBlock, steps = dm.block_steps(blk);
      acc_t* bl = base + u * dm.dstate * kStepBlock;
      for (int64_t i = 0; i < kStepBlock; ++i) {
        const scalar_t* r = i < steps ? in.row(b, t0 + i, g) : nullptr;
        for (int64_t n = 0; n < dm.dstate; ++n) {
          bl[n * kStepBlock + i] = r ? static_cast<acc_t>(r[n]) : acc_t(0);
        }
      }
    }
  });
  return out;
}

// Software prefetch of `width` elements of `steps` rows `stride` elements apart.
template <typename T>
inline void prefetch_rows(const T* base, int64_t stride, int64_t steps, int64_t width,
                          bool for_write) {
  const int64_t bytes = width * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < steps; ++i) {
    const char* row = reinterpret_cast<const char*>(base + i * stride);
    for (int64_t off = 0; off < bytes; off += 64) {
      if (for_write) {
        __builtin_prefetch(row + off, 1, 3);
      } else {
        __builtin_prefetch(row + off, 0, 3);
      }
    }
  }
}

// One head's block of a (B, L, H, P) tensor as a contiguous step-major (steps x P) matrix in
// acc_t (the row operands of the (p x n) passes).
template <typename scalar_t, typename acc_t>
inline void copy_head_block(acc_t* dst, const Strided4<scalar_t>& src, int64_t b, int64_t t0,
                            int64_t h, int64_t steps, int64_t P) {
  for (int64_t i = 0; i < steps; ++i) {
    const scalar_t* r = src.row(b, t0 + i, h);
    for (int64_t p = 0; p < P; ++p) dst[i * P + p] = static_cast<acc_t>(r[p]);
  }
}

// V[i][j] = scale[i] * src[b, t0 + i, k, c0 + j] (scale null: 1) for the tile's lanes, 0 beyond
// `width` (the lane operand of a pass).
template <typename scalar_t, typename acc_t>
inline void gather_lanes(acc_t* V, const Strided4<scalar_t>& src, int64_t b, int64_t t0, int64_t k,
                         int64_t steps, int64_t c0, int64_t width, const acc_t* scale) {
  for (int64_t i = 0; i < steps; ++i) {
    const scalar_t* r = src.row(b, t0 + i, k) + c0;
    acc_t* v = V + i * kTileLanes;
    const acc_t sc = scale ? scale[i] : acc_t(1);
    for (int64_t j = 0; j < width; ++j) v[j] = sc * static_cast<acc_t>(r[j]);
    for (int64_t j = width; j < kTileLanes; ++j) v[j] = acc_t(0);
  }
}

template <typename acc_t>
inline TileOperands<acc_t> operands(const acc_t* U, int64_t ldu, const acc_t* V, int64_t ldv,
                                    const acc_t* R, int64_t ldr, const acc_t* pre, acc_t* acc,
                                    int64_t steps) {
  std::fill(acc, acc + steps * kTileLanes, acc_t(0));
  return {U, ldu, V, ldv, R, ldr, pre, acc, steps};
}

// A task's share of one batch element's column tiles: the (n x p) passes own (h, p tile) pairs
// in h-major order, the (p x n) passes (head subset, n tile) pairs. `count` ranges of `per`
// tiles, for about twice as many tasks as threads.
struct Ranges {
  int64_t count, per;
};

inline Ranges split_ranges(int64_t items, int64_t base_units) {
  const int64_t want = 2 * at::get_num_threads();
  const int64_t n = std::max<int64_t>(1, items);
  const int64_t per =
      ceil_div(n, std::clamp<int64_t>(ceil_div(want, std::max<int64_t>(1, base_units)), 1, n));
  return {ceil_div(n, per), per};
}

}  // namespace MBLM_CPU_ISA
}  // namespace mblm::cpu_ssd
