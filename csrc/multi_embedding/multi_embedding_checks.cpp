#include "hmoe/checks.h"
#include "hmoe/multi_embedding.h"

namespace hmoe {

std::pair<int64_t, int64_t> check_multi_embedding_args(
    const at::Tensor& weight, const at::Tensor& indices,
    const std::optional<at::Tensor>& segment_offsets, const at::Tensor& table_offsets,
    int64_t pooling) {
  HMOE_CHECK_DIM(weight, 3);
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous (N, K, D), got strides ",
              weight.strides());
  HMOE_CHECK_INDEX_DTYPE(indices);
  HMOE_CHECK_DTYPE(table_offsets, at::kLong);
  HMOE_CHECK_DIM(table_offsets, 1);
  HMOE_CHECK_DEVICE(indices, weight.device());
  HMOE_CHECK_DEVICE(table_offsets, weight.device());
  TORCH_CHECK(pooling == kPoolingSum || pooling == kPoolingMean,
              "pooling must be 0 (sum) or 1 (mean), got ", pooling);
  const int64_t F = table_offsets.size(0) - 1;
  TORCH_CHECK(F >= 1, "table_offsets must hold F + 1 >= 2 entries, got shape ",
              table_offsets.sizes());
  int64_t B;
  if (segment_offsets.has_value()) {
    const auto& seg = *segment_offsets;
    HMOE_CHECK_DTYPE(seg, at::kLong);
    HMOE_CHECK_DIM(seg, 1);
    HMOE_CHECK_DEVICE(seg, weight.device());
    HMOE_CHECK_DIM(indices, 1);
    TORCH_CHECK((seg.size(0) - 1) % F == 0 && seg.size(0) >= 1,
                "segment_offsets must hold F * B + 1 entries (F = ", F, "), got shape ",
                seg.sizes());
    B = (seg.size(0) - 1) / F;
  } else {
    HMOE_CHECK_DIM(indices, 2);
    TORCH_CHECK(indices.size(1) == F, "indices has ", indices.size(1),
                " fields but table_offsets describes ", F, " (indices shape ", indices.sizes(),
                ")");
    B = indices.size(0);
  }
  return {B, F};
}

}  // namespace hmoe
