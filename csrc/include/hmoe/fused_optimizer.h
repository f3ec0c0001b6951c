// Optimizers fused into backward (hmoe/optim.py), shared by the kernels that apply them.
#pragma once

#include <cstdint>

namespace hmoe {

// The `optimizer` argument of the *_backward_fused_ ops (FUSED_OPTIMIZERS in Python).
enum FusedOptimizer : int64_t { kFusedSGD = 0, kFusedRowWiseAdagrad = 1 };

}  // namespace hmoe
