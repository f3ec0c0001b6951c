// Shared declarations of the fused multi-embedding lookup (see hmoe/ops/multi_embedding.py for
// the math and shapes). The CPU and CUDA kernels share the argument checks defined here.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "hmoe/fused_optimizer.h"

namespace hmoe {

enum Pooling : int64_t { kPoolingSum = 0, kPoolingMean = 1 };

// Checks that hold for every backend; returns (B, F).
std::pair<int64_t, int64_t> check_multi_embedding_args(
    const at::Tensor& weight, const at::Tensor& indices,
    const std::optional<at::Tensor>& segment_offsets, const at::Tensor& table_offsets,
    int64_t pooling);

}  // namespace hmoe
