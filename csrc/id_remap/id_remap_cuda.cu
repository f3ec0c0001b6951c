// CUDA kernel of the id remap of dynamic vocabularies (semantics and state layout:
// hmoe/ops/id_remap.py; id_remap_cpu.cpp is its semantic twin: same op, checks and results).
//
// A simple design that is correct by construction rather than fast:
//   1. the batch's distinct ids in order of first occurrence, their counts and each position's
//      index among them, with ATen's unique + a scatter-min of first positions + a sort;
//   2. the node of each distinct id in the state's table: one thread per id (read-only probes);
//   3. the LRU touches, counts, admissions and evictions, in order, by ONE device thread running
//      State::remap_unique from hmoe/id_remap.h: the very code the CPU kernel runs and the tests
//      compare with the reference. Its cost is O(1) per distinct id but each step is a dependent
//      global-memory access, so this stage bounds the throughput (parallel LRU maintenance is
//      the next step if it matters; see the module docstring);
//   4. each position's row gathered from its distinct id's.
// The call synchronises twice with the host: to read C and P from meta for the checks (and the
// reserved-id check) and to read how many rows were assigned.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "hmoe/checks.h"
#include "hmoe/id_remap.h"

namespace hmoe {
namespace id_remap {
namespace {

constexpr int kBlockThreads = 256;

__global__ void find_nodes_kernel(State state, const int64_t* __restrict__ ids, int64_t n,
                                  int64_t* __restrict__ nodes_out) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    nodes_out[k] = state.find_node(ids[k]);
  }
}

__global__ void remap_unique_kernel(State state, const int64_t* uniq, const int64_t* counts,
                                    int64_t* rows, int64_t U, int64_t min_count,
                                    int64_t* assigned, int64_t* num_assigned) {
  state.remap_unique(uniq, counts, rows, U, min_count, assigned, num_assigned);
}

// The distinct ids of flat in order of first occurrence, their counts, and each position's
// index among them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> distinct_ids(const at::Tensor& flat) {
  const int64_t n = flat.numel();
  if (n == 0) return {flat.new_empty({0}), flat.new_empty({0}), flat.new_empty({0})};
  auto [sorted_ids, sorted_inverse, sorted_counts] =
      at::_unique2(flat, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/true);
  const int64_t U = sorted_ids.numel();
  at::Tensor first = at::full({U}, n, flat.options())
                         .scatter_reduce_(0, sorted_inverse, at::arange(n, flat.options()),
                                          "amin", /*include_self=*/true);
  at::Tensor order = std::get<1>(first.sort());  // sorted position -> first-occurrence rank
  at::Tensor rank = at::empty_like(order).scatter_(0, order, at::arange(U, order.options()));
  return {sorted_ids.index_select(0, order).contiguous(),
          sorted_counts.index_select(0, order).contiguous(),
          rank.index_select(0, sorted_inverse)};
}

std::tuple<at::Tensor, at::Tensor> id_remap_cuda(const at::Tensor& table, const at::Tensor& nodes,
                                                 const at::Tensor& meta, const at::Tensor& ids,
                                                 int64_t min_count) {
  TORCH_CHECK(ids.is_cuda(), "ids must be a CUDA tensor, got ", ids.device());
  const c10::cuda::CUDAGuard guard(ids.device());
  const State state = check_args(table, nodes, meta, ids, min_count);
  const at::Tensor flat = ids.contiguous().view(-1);
  const at::Tensor reserved = (flat == kEmpty);
  if (flat.numel() > 0 && reserved.any().item<bool>()) {
    TORCH_CHECK_VALUE(false, "ids must not contain the reserved id INT64_MIN (", kEmpty,
                      "), found at flat position ", reserved.nonzero()[0][0].item<int64_t>());
  }
  auto [uniq, counts, inverse] = distinct_ids(flat);
  const int64_t U = uniq.numel();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor rows_u = at::empty({U}, ids.options());
  if (U > 0) {
    const int64_t blocks = std::min<int64_t>((U + kBlockThreads - 1) / kBlockThreads, 65535);
    find_nodes_kernel<<<blocks, kBlockThreads, 0, stream>>>(state, uniq.data_ptr<int64_t>(), U,
                                                            rows_u.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor assigned = at::empty({U}, ids.options());
  at::Tensor num_assigned = at::zeros({1}, ids.options());
  remap_unique_kernel<<<1, 1, 0, stream>>>(state, uniq.data_ptr<int64_t>(),
                                           counts.data_ptr<int64_t>(), rows_u.data_ptr<int64_t>(),
                                           U, min_count, assigned.data_ptr<int64_t>(),
                                           num_assigned.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor rows = rows_u.index_select(0, inverse).view(ids.sizes());
  const int64_t A = num_assigned.item<int64_t>();
  return {rows, assigned.narrow(0, 0, A).clone()};
}

}  // namespace
}  // namespace id_remap
}  // namespace hmoe

TORCH_LIBRARY_IMPL(hmoe, CUDA, m) { m.impl("id_remap", &hmoe::id_remap::id_remap_cuda); }
