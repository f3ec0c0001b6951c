// Shared argument checks for hmoe kernels. Messages print the offending shape and dtype so a
// failure names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#define HMOE_CHECK_DEVICE(t, dev) \
  TORCH_CHECK((t).device() == (dev), #t " must be on ", (dev), ", got ", (t).device())

#define HMOE_CHECK_DIM(t, n) \
  TORCH_CHECK((t).dim() == (n), #t " must have ", (n), " dims, got shape ", (t).sizes())

#define HMOE_CHECK_INDEX_DTYPE(t)                                                  \
  TORCH_CHECK((t).scalar_type() == at::kInt || (t).scalar_type() == at::kLong,    \
              #t " must be int32 or int64, got ", (t).scalar_type())

#define HMOE_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", (dt), ", got ", (t).scalar_type())

// Compiles a function twice, for the x86-64 baseline and for AVX2 ("arch=..." clones dispatch on
// the CPU model, not its features, so they never fire on AMD); the
// loader picks the clone the CPU supports (GCC / Clang function multiversioning). Only for
// loops the compiler vectorises on its own; elsewhere, and off x86-64, it expands to nothing.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define HMOE_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HMOE_SIMD_CLONES
#endif

namespace hmoe {

// Number of bits needed to represent values in [0, n).
inline int bits_for(int64_t n) {
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) < n) ++bits;
  return bits;
}

}  // namespace hmoe
