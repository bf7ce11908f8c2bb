// Argument checks shared by the CPU and CUDA kernels. Every message names the argument,
// what was expected and what was received.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define MBLM_CHECK_DIM(t, n)                                                             \
  TORCH_CHECK((t).dim() == (n), "mblm: " #t " must have ", (n), " dims, got shape ", \
              (t).sizes())

#define MBLM_CHECK_SAME_DEVICE(a, b)                                                     \
  TORCH_CHECK((a).device() == (b).device(), "mblm: " #a " is on ", (a).device(),     \
              " but " #b " is on ", (b).device())

#define MBLM_CHECK_SAME_DTYPE(a, b)                                                      \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), "mblm: " #a " has dtype ",     \
              (a).scalar_type(), " but " #b " has dtype ", (b).scalar_type())

#define MBLM_CHECK_FLOATING(t)                                                           \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()),                                  \
              "mblm: " #t " must be float64/float32/float16/bfloat16, got ",           \
              (t).scalar_type())

#define MBLM_CHECK_SIZE(t, d, n)                                                         \
  TORCH_CHECK((t).size(d) == (n), "mblm: " #t ".size(", (d), ") must be ", (n),       \
              ", got shape ", (t).sizes())

#define MBLM_CHECK_LAST_CONTIGUOUS(t)                                                    \
  TORCH_CHECK((t).stride(-1) == 1 || (t).size(-1) <= 1, "mblm: " #t                  \
              " must have a contiguous last dimension, got strides ", (t).strides())
