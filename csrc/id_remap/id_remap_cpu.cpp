// CPU kernel of the id remap of dynamic vocabularies (semantics and state layout:
// hmoe/ops/id_remap.py; the state machine itself: hmoe/id_remap.h).
//
// One call, O(1) amortised per id, never a scan of the state:
//   1. the batch's distinct ids in order of first occurrence, their counts and each position's
//      index among them, through a batch-local open-addressing table (sequential, cache-sized);
//   2. the node of each distinct id in the state's table (read-only probes, the cache misses of
//      the call, prefetched; split across threads only for very large batches);
//   3. the LRU touches, counts, admissions and evictions, in order (sequential, as the
//      semantics demand): State::remap_unique;
//   4. each position's row from its distinct id's (a gather).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "hmoe/checks.h"
#include "hmoe/id_remap.h"

namespace hmoe {
namespace id_remap {
namespace {

constexpr int64_t kGrain = 1 << 16;

struct Distinct {
  std::vector<int64_t> ids, counts;  // (U,) in order of first occurrence
  std::vector<int64_t> inverse;      // (n,) position -> index in ids
};

Distinct distinct_ids(const int64_t* x, int64_t n) {
  int64_t size = 16;
  while (size < 2 * n) size *= 2;
  const int64_t mask = size - 1;
  std::vector<int64_t> slots(2 * size, kEmpty);  // [id, index] per slot: one cache line a probe
  Distinct d;
  d.inverse.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = x[i];
    TORCH_CHECK_VALUE(id != kEmpty, "ids must not contain the reserved id INT64_MIN (", kEmpty,
                      "), found at flat position ", i);
    int64_t slot = int64_t(mix64(uint64_t(id)) & uint64_t(mask));
    while (slots[2 * slot] != kEmpty && slots[2 * slot] != id) slot = (slot + 1) & mask;
    if (slots[2 * slot] == kEmpty) {
      slots[2 * slot] = id;
      slots[2 * slot + 1] = int64_t(d.ids.size());
      d.ids.push_back(id);
      d.counts.push_back(0);
    }
    const int64_t k = slots[2 * slot + 1];
    ++d.counts[k];
    d.inverse[i] = k;
  }
  return d;
}

std::tuple<at::Tensor, at::Tensor> id_remap_cpu(const at::Tensor& table, const at::Tensor& nodes,
                                                const at::Tensor& meta, const at::Tensor& ids,
                                                int64_t min_count) {
  TORCH_CHECK(ids.device().is_cpu(), "ids must be a CPU tensor, got ", ids.device());
  const State state = check_args(table, nodes, meta, ids, min_count);
  const at::Tensor flat = ids.contiguous().view(-1);
  const int64_t n = flat.numel();
  const Distinct d = distinct_ids(flat.data_ptr<int64_t>(), n);
  const int64_t U = int64_t(d.ids.size());

  // Probes miss the cache; prefetching the home slots a few ids ahead overlaps the misses, so
  // one thread keeps up with a batch and only large ones are split (a parallel region costs a
  // scheduler tick whenever the machine is busy).
  std::vector<int64_t> rows_u(U);
  at::parallel_for(0, U, kGrain, [&](int64_t begin, int64_t end) {
    constexpr int64_t kAhead = 16;
    for (int64_t k = begin; k < end; ++k) {
      if (k + kAhead < end) __builtin_prefetch(&state.key(state.home(d.ids[k + kAhead])));
      rows_u[k] = state.find_node(d.ids[k]);
    }
  });
  at::Tensor assigned = at::empty({U}, ids.options());
  int64_t num_assigned = 0;
  state.remap_unique(d.ids.data(), d.counts.data(), rows_u.data(), U, min_count,
                     assigned.data_ptr<int64_t>(), &num_assigned);

  at::Tensor rows = at::empty({n}, ids.options());
  int64_t* out = rows.data_ptr<int64_t>();
  at::parallel_for(0, n, 4 * kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = rows_u[d.inverse[i]];
  });
  return {rows.view(ids.sizes()), assigned.narrow(0, 0, num_assigned).clone()};
}

}  // namespace
}  // namespace id_remap
}  // namespace hmoe

TORCH_LIBRARY_IMPL(hmoe, CPU, m) { m.impl("id_remap", &hmoe::id_remap::id_remap_cpu); }
