// Argument checks of the id remap shared by its CPU and CUDA kernels (hmoe/ops/id_remap.py checks
// the same in Python first, with the same meaning, for its reference backend).

#include "hmoe/checks.h"
#include "hmoe/id_remap.h"

#include <utility>

namespace hmoe {
namespace id_remap {

State check_args(const at::Tensor& table, const at::Tensor& nodes, const at::Tensor& meta,
                 const at::Tensor& ids, int64_t min_count) {
  TORCH_CHECK_VALUE(min_count >= 1, "min_count must be >= 1, got ", min_count);
  HMOE_CHECK_DTYPE(ids, at::kLong);
  const std::pair<const char*, const at::Tensor*> state[] = {
      {"table", &table}, {"nodes", &nodes}, {"meta", &meta}};
  for (const auto& [name, t] : state) {
    TORCH_CHECK(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), name, " must be contiguous, got strides ", t->strides());
    TORCH_CHECK(t->device() == ids.device(), name, " must be on the device of ids (",
                ids.device(), "), got ", t->device());
  }
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 2,
              "table must be (S, 2) [key, node], got shape ", table.sizes());
  TORCH_CHECK(nodes.dim() == 2 && nodes.size(1) == kNodeFields,
              "nodes must be (C + P + 2, 4) [id, value, prev, next], got shape ", nodes.sizes());
  TORCH_CHECK(meta.dim() == 1 && meta.size(0) == kMetaFields, "meta must be (", kMetaFields,
              ",), got shape ", meta.sizes());
  const at::Tensor host = meta.cpu();
  const int64_t C = host.data_ptr<int64_t>()[kCapacity];
  const int64_t P = host.data_ptr<int64_t>()[kPendingCapacity];
  TORCH_CHECK(C >= 1 && P >= 1, "meta holds capacity ", C, " and pending capacity ", P,
              ": both must be >= 1");
  TORCH_CHECK(nodes.size(0) == C + P + 2, "nodes must have C + P + 2 = ", C + P + 2,
              " rows for capacity ", C, " and pending capacity ", P, ", got shape ",
              nodes.sizes());
  const int64_t S = table.size(0);
  TORCH_CHECK(S >= 2 * (C + P) && (S & (S - 1)) == 0, "table must have a power of two >= ",
              2 * (C + P), " slots (2 (C + P)), got shape ", table.sizes());
  return State{table.data_ptr<int64_t>(), S - 1, nodes.data_ptr<int64_t>(),
               meta.data_ptr<int64_t>(), C, P};
}

}  // namespace id_remap
}  // namespace hmoe
