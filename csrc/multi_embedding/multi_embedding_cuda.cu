// CUDA kernels of the fused multi-embedding lookup (math and shapes: hmoe/ops/multi_embedding.py;
// multi_embedding_cpu.cpp is the semantic twin of this file: same ops, checks and results).
//
// Forward, single-hot: one launch covers every field and set. A thread group of G lanes (a warp,
// or a sub-warp when the row is narrow: G = min(32, next pow2 of the row's vectors)) owns a few
// (sample, field) slots at a time. The slot's row holds all K sets, K*D contiguous values, so the
// group reads it once with 16-byte vectors and writes K runs of D values, one per output plane.
// The lookup is a pure copy, so it moves raw bytes: the widest unit (16, 8, 4 or 2 bytes) that
// divides a set's D values and both pointers' alignment, whatever the dtype (D = 13 fp32 -> 4 B).
// A group issues the loads of kUnroll slots before storing any: a gather from a large table is
// bound by misses in flight, not by bandwidth (PERF_NOTES 1.2, 2.2).
//
// Forward, jagged: a group per segment, fp32 (opmath) accumulators in registers, kUnroll rows in
// flight; rows wider than the registers are done in passes that re-read only the indices.
//
// Backward: every lookup contributes c_s * grad[:, b, f, :] to one weight row. Each lookup becomes
// a (row, segment) pair; a stable CUB radix sort over the bits of N groups them by row (stable:
// a row's lookups keep input order, so sums are deterministic and in the CPU kernel's order), a
// run-length encode finds the runs, and ONE kernel gives each run a group that sums it in
// registers and then applies it: write the dense row, write (row, gradient) for the sparse
// gradient, or update the row in place with SGD / row-wise Adagrad (FBGEMM's fused TBE backward,
// PERF_NOTES 2.3). Every row belongs to one run, so no two groups write the same row: no atomics.
// A run is never split across groups (FBGEMM's deterministic mode), so a very hot row is a
// serial tail; the trade buys determinism.
//
// Bad input: ids are range-checked by the Python layer before a CUDA call, but the kernels guard
// every lookup anyway, because the ops are public. A bad id (outside [0, vocab_f), or a row past
// the weight's N rows) or bad segment_offsets is never dereferenced: the kernel prints the field,
// sample and id and fires a device-side assert (CUDA_KERNEL_ASSERT, on in release builds too).
// The alternative, an error flag read back and raised with TORCH_CHECK, costs a device->host sync
// on every call, i.e. on the training hot path; the assert costs nothing until it fires. The price
// is that it surfaces at the next synchronisation as "device-side assert triggered" and leaves
// the CUDA context unusable. For the same reason the CPU kernel's data-dependent checks that
// would need a sync (table_offsets[-1] == num_rows / weight.size(0), segment_offsets start at 0,
// end at nnz and never decrease) are device-side asserts here. The one op that must sync anyway,
// backward_rows (its output size is the number of distinct rows), reads table_offsets[-1] on the
// host. Should asserts be compiled out, a bad lookup reads nothing and contributes zeros.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "hmoe/checks.h"
#include "hmoe/cuda_vec.h"
#include "hmoe/multi_embedding.h"

namespace hmoe {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kUnroll = 4;  // lookups whose loads are issued before any is consumed

// ---------------------------------------------------------------------------------------------
// Launch geometry

// Lanes per thread group for a row of `units` vectors: the smallest power of two covering the
// row, at most a warp, so that narrow rows (small K*D) do not leave most of a warp idle.
int group_size_for(int64_t units) {
  int lanes = 1;
  while (lanes < kWarpSize && lanes < units) lanes <<= 1;
  return lanes;
}

// Blocks for `work` items at `per_block` items each. Kernels loop grid-stride, so the grid is
// capped at a few waves of resident blocks instead of growing with the batch.
dim3 grid_for(int64_t work, int64_t per_block) {
  const int64_t needed = (work + per_block - 1) / per_block;
  const int64_t resident = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                           (2048 / kBlockThreads);
  return dim3(unsigned(std::max<int64_t>(1, std::min(needed, 4 * resident))));
}

bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % uintptr_t(bytes) == 0;
}

// A (sub-)warp of `size` lanes that works on one slot, segment or run at a time. Groups never
// straddle a warp, and every lane of a group follows the same control flow, so shuffles name
// only the group's lanes in their mask.
struct Group {
  int size, lane, per_block;
  int64_t index;  // global index of this group
  unsigned mask;

  __device__ explicit Group(int lanes) : size(lanes) {
    lane = threadIdx.x % lanes;
    per_block = blockDim.x / lanes;
    index = int64_t(blockIdx.x) * per_block + threadIdx.x / lanes;
    mask = lanes == kWarpSize ? 0xffffffffu
                              : ((1u << lanes) - 1u) << ((threadIdx.x % kWarpSize) / lanes * lanes);
  }
  __device__ int64_t stride() const { return int64_t(gridDim.x) * per_block; }

  // Butterfly sum: every lane ends with the same, bit-identical value (each step adds the same
  // two numbers in both lanes), in an order fixed by the group size: deterministic.
  template <typename T>
  __device__ T sum(T value) const {
    for (int offset = size / 2; offset > 0; offset /= 2) {
      value += __shfl_xor_sync(mask, value, offset, size);
    }
    return value;
  }
  template <typename T>
  __device__ T from_lane0(T value) const {
    return __shfl_sync(mask, value, 0, size);
  }
};

// K*D values as 16-byte vectors (kVec = 16 / sizeof(scalar_t)), or scalars (kVec = 1) where D or
// a pointer does not allow it.
// Vec, load_vec, store_vec, zero_vec: hmoe/cuda_vec.h.

// How the pooling kernels hold a row: kVec values per vector, kLaneVecs vectors per lane per pass
// (a pass covers G * kLaneVecs * kVec values of the row). Rows that a group covers with one vector
// per lane get kLaneVecs = 1: few registers, so more groups in flight per SM; wider rows get 2
// (FBGEMM's kMaxVecsPerThread idea) and rows wider than a pass take several passes. Calls
// launch(kVec, kLaneVecs) with both as std::integral_constant.
template <int kWide, typename Launch>
void dispatch_row_layout(bool wide, int64_t row_values, const Launch& launch) {
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  using Wide = std::integral_constant<int, kWide>;
  const bool narrow = (row_values + (wide ? kWide : 1) - 1) / (wide ? kWide : 1) <= kWarpSize;
  if (wide) {
    narrow ? launch(Wide{}, One{}) : launch(Wide{}, Two{});
  } else {
    narrow ? launch(One{}, One{}) : launch(One{}, Two{});
  }
}

// ---------------------------------------------------------------------------------------------
// Device-side checks (see the file comment for why they assert instead of raising)

// Global row of the local id of field f, or -1 after reporting an id outside [0, vocab_f) or a
// row outside the weight's [0, num_rows). Only the reporting lane prints, all lanes assert.
__device__ __forceinline__ int64_t checked_row(int64_t id, int64_t f, int64_t b,
                                               const int64_t* __restrict__ table_offsets,
                                               int64_t num_rows, bool report) {
  const int64_t first = table_offsets[f];
  const int64_t vocab = table_offsets[f + 1] - first, row = first + id;
  if (id >= 0 && id < vocab && row >= 0 && row < num_rows) return row;
  if (report) {
    printf("hmoe.multi_embedding (CUDA): indices: field %lld (sample %lld) has id %lld, outside "
           "[0, %lld), or its row %lld is outside the %lld rows of the weight\n",
           (long long)f, (long long)b, (long long)id, (long long)vocab, (long long)row,
           (long long)num_rows);
  }
  CUDA_KERNEL_ASSERT(false && "hmoe.multi_embedding: index out of range");
  return -1;
}

// Whether segment s's bounds are valid: 0 <= begin <= end <= nnz, the first segment starts at 0
// and the last ends at nnz (the CPU kernel's checks on segment_offsets).
__device__ __forceinline__ bool checked_segment(int64_t begin, int64_t end, int64_t s,
                                                int64_t num_segments, int64_t nnz, bool report) {
  if (begin >= 0 && begin <= end && end <= nnz && (s != 0 || begin == 0) &&
      (s != num_segments - 1 || end == nnz)) {
    return true;
  }
  if (report) {
    printf("hmoe.multi_embedding (CUDA): segment_offsets must start at 0, end at "
           "indices.numel() = %lld and never decrease; segment %lld spans [%lld, %lld)\n",
           (long long)nnz, (long long)s, (long long)begin, (long long)end);
  }
  CUDA_KERNEL_ASSERT(false && "hmoe.multi_embedding: bad segment_offsets");
  return false;
}

// ---------------------------------------------------------------------------------------------
// Forward, single-hot: a gather-copy of raw units

template <int kBytes>
struct CopyUnit;
template <>
struct CopyUnit<16> { using type = uint4; };
template <>
struct CopyUnit<8> { using type = uint2; };
template <>
struct CopyUnit<4> { using type = uint32_t; };
template <>
struct CopyUnit<2> { using type = uint16_t; };

// weight (N, K, D) and out (K, B, F, D) seen as units: a set is set_units units, a row
// row_units = K * set_units. Slot s = b * F + f reads row table_offsets[f] + indices[b, f];
// row unit e (set k = e / set_units) goes to out[k, b, f, :], i.e. unit k * plane + s * set_units
// + (e - k * set_units).
template <typename unit_t, typename index_t>
__global__ void __launch_bounds__(kBlockThreads) forward_single_hot_kernel(
    const unit_t* __restrict__ weight, const index_t* __restrict__ indices,
    const int64_t* __restrict__ table_offsets, unit_t* __restrict__ out, int64_t B, int64_t F,
    int64_t num_rows, int64_t set_units, int64_t row_units, int group_size) {
  const Group group(group_size);
  const int64_t num_slots = B * F, plane = num_slots * set_units;
  for (int64_t s0 = group.index * kUnroll; s0 < num_slots; s0 += group.stride() * kUnroll) {
    // Every lane reads the same few ids (one broadcast transaction) and checks them.
    int64_t rows[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = s0 + u;
      rows[u] = s < num_slots ? checked_row(int64_t(indices[s]), s % F, s / F, table_offsets,
                                            num_rows, group.lane == 0)
                              : -1;
    }
    for (int64_t e = group.lane; e < row_units; e += group.size) {
      const int64_t k = e / set_units;
      unit_t* dst = out + k * plane + (e - k * set_units);
      unit_t values[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll rows in flight
        values[u] = rows[u] >= 0 ? weight[rows[u] * row_units + e] : unit_t{};
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (s0 + u < num_slots) dst[(s0 + u) * set_units] = values[u];
      }
    }
  }
}

template <typename index_t>
void launch_forward_single_hot(const at::Tensor& weight, const at::Tensor& indices,
                               const at::Tensor& table_offsets, const at::Tensor& out, int64_t B,
                               int64_t F, cudaStream_t stream) {
  const int64_t K = weight.size(1), D = weight.size(2);
  const int64_t set_bytes = D * int64_t(weight.element_size());
  // The widest unit that divides a set's bytes and both base pointers' alignment; the element
  // size always qualifies (every supported dtype is 2, 4 or 8 bytes).
  int64_t unit = 16;
  while (unit > weight.element_size() &&
         !(set_bytes % unit == 0 && is_aligned(weight.data_ptr(), unit) &&
           is_aligned(out.data_ptr(), unit))) {
    unit /= 2;
  }
  const int64_t set_units = set_bytes / unit, row_units = K * set_units;
  const int group_size = group_size_for(row_units);
  const int64_t slots_per_block = int64_t(kBlockThreads / group_size) * kUnroll;
  const dim3 grid = grid_for(B * F, slots_per_block);
  auto launch = [&](auto unit_tag) {
    using unit_t = typename decltype(unit_tag)::type;
    forward_single_hot_kernel<unit_t, index_t><<<grid, kBlockThreads, 0, stream>>>(
        static_cast<const unit_t*>(weight.data_ptr()), indices.data_ptr<index_t>(),
        table_offsets.data_ptr<int64_t>(), static_cast<unit_t*>(out.data_ptr()), B, F,
        weight.size(0), set_units, row_units, group_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (unit) {
    case 16: launch(CopyUnit<16>{}); break;
    case 8: launch(CopyUnit<8>{}); break;
    case 4: launch(CopyUnit<4>{}); break;
    default: launch(CopyUnit<2>{}); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, jagged: a group per field-major segment s = f * B + b, pooled in registers

template <typename scalar_t, typename index_t, int kVec, int kLaneVecs>
__global__ void __launch_bounds__(kBlockThreads) forward_jagged_kernel(
    const scalar_t* __restrict__ weight, const index_t* __restrict__ indices,
    const int64_t* __restrict__ segment_offsets, const int64_t* __restrict__ table_offsets,
    scalar_t* __restrict__ out, int64_t B, int64_t F, int64_t K, int64_t D, int64_t num_rows,
    int64_t nnz, bool mean, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, kVec>;
  const Group group(group_size);
  const int64_t num_segments = B * F, KD = K * D, plane = num_segments * D;
  const int64_t pass_width = int64_t(group.size) * kVec * kLaneVecs;  // values per pass
  for (int64_t s = group.index; s < num_segments; s += group.stride()) {
    const int64_t f = s / B, b = s - f * B;
    int64_t begin = segment_offsets[s], end = segment_offsets[s + 1];
    if (!checked_segment(begin, end, s, num_segments, nnz, group.lane == 0)) begin = end = 0;
    const acc_t scale =
        !mean ? acc_t(1) : end > begin ? acc_t(1) / acc_t(end - begin) : acc_t(0);
    scalar_t* dst = out + (b * F + f) * D;  // out[0, b, f, :]
    for (int64_t e0 = 0; e0 < KD; e0 += pass_width) {
      acc_t acc[kLaneVecs][kVec];
#pragma unroll
      for (int i = 0; i < kLaneVecs; ++i) {
#pragma unroll
        for (int c = 0; c < kVec; ++c) acc[i][c] = acc_t(0);
      }
      for (int64_t j0 = begin; j0 < end; j0 += kUnroll) {
        int64_t rows[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          rows[u] = j0 + u < end ? checked_row(int64_t(indices[j0 + u]), f, b, table_offsets,
                                               num_rows, group.lane == 0)
                                 : -1;
        }
        vec_t values[kUnroll][kLaneVecs];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int i = 0; i < kLaneVecs; ++i) {
            const int64_t e = e0 + int64_t(group.lane + i * group.size) * kVec;
            values[u][i] = rows[u] >= 0 && e < KD
                               ? load_vec<scalar_t, kVec>(weight + rows[u] * KD + e)
                               : zero_vec<scalar_t, kVec>();
          }
        }
        // Summed in lookup order, like the CPU kernel (a missing row adds exact zeros).
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int i = 0; i < kLaneVecs; ++i) {
#pragma unroll
            for (int c = 0; c < kVec; ++c) acc[i][c] += acc_t(values[u][i].v[c]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kLaneVecs; ++i) {
        const int64_t e = e0 + int64_t(group.lane + i * group.size) * kVec;
        if (e >= KD) continue;
        const int64_t k = e / D;  // kVec divides D: a vector never straddles two sets
        vec_t pooled;
#pragma unroll
        for (int c = 0; c < kVec; ++c) pooled.v[c] = scalar_t(acc[i][c] * scale);
        store_vec<scalar_t, kVec>(dst + k * plane + (e - k * D), pooled);
      }
    }
  }
}

template <typename index_t>
void launch_forward_jagged(const at::Tensor& weight, const at::Tensor& indices,
                           const at::Tensor& segment_offsets, const at::Tensor& table_offsets,
                           const at::Tensor& out, int64_t B, int64_t F, bool mean,
                           cudaStream_t stream) {
  const int64_t K = weight.size(1), D = weight.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "multi_embedding_cuda", [&] {
        constexpr int kWide = 16 / int(sizeof(scalar_t));
        const bool wide = D % kWide == 0 && is_aligned(weight.data_ptr(), 16) &&
                          is_aligned(out.data_ptr(), 16);
        dispatch_row_layout<kWide>(wide, K * D, [&](auto vec_tag, auto lane_vecs_tag) {
          constexpr int kVec = decltype(vec_tag)::value;
          const int group_size = group_size_for((K * D + kVec - 1) / kVec);
          const dim3 grid = grid_for(B * F, kBlockThreads / group_size);
          forward_jagged_kernel<scalar_t, index_t, kVec, decltype(lane_vecs_tag)::value>
              <<<grid, kBlockThreads, 0, stream>>>(
                  weight.data_ptr<scalar_t>(), indices.data_ptr<index_t>(),
                  segment_offsets.data_ptr<int64_t>(), table_offsets.data_ptr<int64_t>(),
                  out.data_ptr<scalar_t>(), B, F, K, D, weight.size(0), indices.numel(), mean,
                  group_size);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

at::Tensor multi_embedding_cuda(const at::Tensor& weight, const at::Tensor& indices_in,
                                const std::optional<at::Tensor>& segment_offsets,
                                const at::Tensor& table_offsets_in, int64_t pooling) {
  // Not a structured binding: the lambdas below capture B and F, which C++17 does not allow for
  // structured bindings (torch < 2.14 may compile this file as C++17).
  const std::pair<int64_t, int64_t> batch_fields =
      check_multi_embedding_args(weight, indices_in, segment_offsets, table_offsets_in, pooling);
  const int64_t B = batch_fields.first, F = batch_fields.second;
  TORCH_CHECK(weight.is_cuda(), "weight must be a CUDA tensor, got ", weight.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const int64_t K = weight.size(1), D = weight.size(2);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor table_offsets = table_offsets_in.contiguous();
  auto out = at::empty({K, B, F, D}, weight.options());  // (K, B, F, D)
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "multi_embedding_cuda", [&] {
    if (segment_offsets.has_value()) {
      TORCH_CHECK(segment_offsets->is_contiguous(), "segment_offsets must be contiguous, got "
                  "strides ", segment_offsets->strides());
      launch_forward_jagged<index_t>(weight, indices, *segment_offsets, table_offsets, out, B, F,
                                     pooling == kPoolingMean, stream);
    } else {
      launch_forward_single_hot<index_t>(weight, indices, table_offsets, out, B, F, stream);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward, step 1: every lookup as a (row, segment) pair, sorted by row into runs

// Lookup j of segment s (s = b * F + f single-hot, f * B + b jagged) becomes (rows[j],
// segments[j] = s). One thread per segment; a bad id gets the row num_rows, which the sort puts
// last and the reduction skips. Thread 0 also checks that table_offsets ends at num_rows.
template <typename index_t>
__global__ void __launch_bounds__(kBlockThreads) build_lookups_kernel(
    const index_t* __restrict__ indices, const int64_t* __restrict__ segment_offsets,
    const int64_t* __restrict__ table_offsets, int64_t B, int64_t F, int64_t num_rows,
    int64_t nnz, int64_t* __restrict__ rows, int32_t* __restrict__ segments) {
  const int64_t num_segments = B * F;
  if (blockIdx.x == 0 && threadIdx.x == 0 && table_offsets[F] != num_rows) {
    printf("hmoe.multi_embedding (CUDA): table_offsets[-1] = %lld but the weight has %lld rows\n",
           (long long)table_offsets[F], (long long)num_rows);
    CUDA_KERNEL_ASSERT(false && "hmoe.multi_embedding: table_offsets[-1] != num_rows");
  }
  for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s < num_segments;
       s += int64_t(gridDim.x) * blockDim.x) {
    int64_t f, b, begin, end;
    if (segment_offsets != nullptr) {
      f = s / B, b = s - f * B;
      begin = segment_offsets[s], end = segment_offsets[s + 1];
      if (!checked_segment(begin, end, s, num_segments, nnz, true)) begin = end = 0;
    } else {
      f = s % F, b = s / F, begin = s, end = s + 1;
    }
    for (int64_t j = begin; j < end; ++j) {
      const int64_t row = checked_row(int64_t(indices[j]), f, b, table_offsets, num_rows, true);
      rows[j] = row >= 0 ? row : num_rows;
      segments[j] = int32_t(s);
    }
  }
}

// Arguments of a backward op after the checks shared with the CPU kernel.
struct BackwardArgs {
  at::Tensor grad, indices, table_offsets;  // contiguous
  std::optional<at::Tensor> segment_offsets;
  int64_t B, F, K, D, nnz;
  bool mean;
};

BackwardArgs prepare_backward(const at::Tensor& grad, const at::Tensor& indices,
                              const std::optional<at::Tensor>& segment_offsets,
                              const at::Tensor& table_offsets, int64_t pooling) {
  HMOE_CHECK_DIM(grad, 4);
  TORCH_CHECK(grad.is_cuda(), "grad must be a CUDA tensor, got ", grad.device());
  // The weight's (K, D) come from grad; a (1, K, D) stand-in lets the shared checks run.
  const auto stand_in = at::empty({1, grad.size(0), grad.size(3)}, grad.options());
  const auto [B, F] =
      check_multi_embedding_args(stand_in, indices, segment_offsets, table_offsets, pooling);
  TORCH_CHECK(grad.size(1) == B && grad.size(2) == F, "grad must have shape (K, ", B, ", ", F,
              ", D), got ", grad.sizes());
  const bool jagged = segment_offsets.has_value();
  if (jagged) {
    TORCH_CHECK(segment_offsets->is_contiguous(), "segment_offsets must be contiguous, got "
                "strides ", segment_offsets->strides());
  }
  const int64_t nnz = jagged ? indices.numel() : B * F;
  TORCH_CHECK(B * F > 0 || nnz == 0, "segment_offsets describes no segments (B = 0) but "
              "indices holds ", nnz, " values (shape ", indices.sizes(), ")");
  // Sorted lookups carry their segment as int32, and CUB's run-length encode counts in int.
  TORCH_CHECK(B * F <= INT_MAX && nnz <= INT_MAX, "the CUDA backward supports at most 2^31 - 1 "
              "segments and lookups per call, got B * F = ", B * F, " and ", nnz, " lookups");
  return {grad.contiguous(), indices.contiguous(), table_offsets.contiguous(), segment_offsets,
          B, F, grad.size(0), grad.size(3), nnz, pooling == kPoolingMean};
}

// Lookups grouped by row: the first num_runs entries of run_rows are the distinct rows in
// increasing order, run u's lookups are segments[run_starts[u] : run_starts[u] + run_lengths[u]],
// listed in input order. Buffers are sized for the worst case (nnz runs) because num_runs lives
// on the device; reading it on the host would cost a sync.
struct SortedLookups {
  at::Tensor run_rows;     // (nnz,) int64
  at::Tensor run_starts;   // (nnz,) int32
  at::Tensor run_lengths;  // (nnz,) int32
  at::Tensor segments;     // (nnz,) int32
  at::Tensor num_runs;     // () int64, on the device
};

SortedLookups sort_lookups(const BackwardArgs& a, int64_t num_rows, cudaStream_t stream) {
  const auto options = a.indices.options();
  const int64_t nnz = a.nnz;
  auto rows = at::empty({nnz}, options.dtype(at::kLong));
  auto segments = at::empty({nnz}, options.dtype(at::kInt));
  AT_DISPATCH_INDEX_TYPES(a.indices.scalar_type(), "multi_embedding_backward_cuda", [&] {
    const int64_t* seg = a.segment_offsets ? a.segment_offsets->data_ptr<int64_t>() : nullptr;
    build_lookups_kernel<index_t><<<grid_for(a.B * a.F, kBlockThreads), kBlockThreads, 0, stream>>>(
        a.indices.data_ptr<index_t>(), seg, a.table_offsets.data_ptr<int64_t>(), a.B, a.F,
        num_rows, nnz, rows.data_ptr<int64_t>(), segments.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  SortedLookups sorted;
  auto sorted_rows = at::empty({nnz}, options.dtype(at::kLong));
  sorted.segments = at::empty({nnz}, options.dtype(at::kInt));
  sorted.run_rows = at::empty({nnz}, options.dtype(at::kLong));
  // Zeroed so that the scan below, which runs over all nnz entries, only ever adds zeros past
  // the last run.
  sorted.run_lengths = at::zeros({nnz}, options.dtype(at::kInt));
  sorted.run_starts = at::empty({nnz}, options.dtype(at::kInt));
  sorted.num_runs = at::empty({}, options.dtype(at::kLong));

  // Rows lie in [0, num_rows] (num_rows marks a bad id), so the sort needs only that many bits:
  // fewer radix passes than a full 64-bit sort.
  const int end_bit = std::max(1, bits_for(num_rows + 1));
  const int64_t* rows_in = rows.data_ptr<int64_t>();
  int64_t* rows_out = sorted_rows.data_ptr<int64_t>();
  const int32_t* segments_in = segments.data_ptr<int32_t>();
  int32_t* segments_out = sorted.segments.data_ptr<int32_t>();
  int64_t* run_rows = sorted.run_rows.data_ptr<int64_t>();
  int32_t* run_lengths = sorted.run_lengths.data_ptr<int32_t>();
  int32_t* run_starts = sorted.run_starts.data_ptr<int32_t>();
  int64_t* num_runs = sorted.num_runs.data_ptr<int64_t>();

  // One temporary buffer, from PyTorch's caching allocator, serves the three CUB calls.
  size_t sort_bytes = 0, encode_bytes = 0, scan_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, rows_in, rows_out,
                                                 segments_in, segments_out, nnz, 0, end_bit,
                                                 stream));
  C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(nullptr, encode_bytes, rows_out, run_rows,
                                                    run_lengths, num_runs, int(nnz), stream));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, run_lengths, run_starts, nnz,
                                               stream));
  const size_t temp_bytes = std::max({sort_bytes, encode_bytes, scan_bytes, size_t(1)});
  auto temp = at::empty({int64_t(temp_bytes)}, options.dtype(at::kByte));
  void* temp_ptr = temp.data_ptr();

  // Stable: equal rows keep their input order, which fixes each run's summation order.
  sort_bytes = temp_bytes;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp_ptr, sort_bytes, rows_in, rows_out,
                                                 segments_in, segments_out, nnz, 0, end_bit,
                                                 stream));
  encode_bytes = temp_bytes;
  C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(temp_ptr, encode_bytes, rows_out, run_rows,
                                                    run_lengths, num_runs, int(nnz), stream));
  scan_bytes = temp_bytes;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp_ptr, scan_bytes, run_lengths, run_starts,
                                               nnz, stream));
  return sorted;
}

// ---------------------------------------------------------------------------------------------
// Backward, step 2: one group per run sums it in registers and applies the sum

template <typename scalar_t>
struct ReduceParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad;              // (K, B, F, D)
  const int32_t* segments;           // (nnz,) sorted lookups' segments
  const int64_t* run_rows;           // (>= U,)
  const int32_t* run_starts;         // (>= U,)
  const int32_t* run_lengths;        // (>= U,)
  const int64_t* num_runs;           // U, on the device
  const int64_t* segment_offsets;    // (F * B + 1,), nullptr for single-hot
  int32_t B, F;
  int64_t K, D, num_rows;
  bool mean;
  scalar_t* out;     // dense gradient (N, K, D), row gradients (U, K, D) or the weight (N, K, D)
  bool out_by_run;   // out's row for run u: u (row gradients) or the weight row
  acc_t* state;      // (N, K) row-wise Adagrad accumulators; nullptr: no state (SGD / no step)
  acc_t lr, eps;
  int group_size;
};

// acc = sum over the run's lookups q in [start, end) of c_s * grad[:, b, f, :] restricted to the
// row elements [e0, e1) this pass covers. Lane l holds the vectors starting at
// e0 + (l + i * G) * kVec, i < kLaneVecs.
template <typename scalar_t, int kVec, int kLaneVecs>
__device__ __forceinline__ void accumulate_run(const ReduceParams<scalar_t>& p, const Group& group,
                                               int64_t start, int64_t end, int64_t e0, int64_t e1,
                                               at::opmath_type<scalar_t> (&acc)[kLaneVecs][kVec]) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, kVec>;
  const int32_t num_segments = p.B * p.F;
  const int64_t plane = int64_t(num_segments) * p.D;
  // Where this lane's vectors sit inside one slot's gradient: element e = k * D + d of the row
  // is grad[k, b, f, d], at k * plane + slot * D + d. Fixed for the whole run.
  int64_t offset[kLaneVecs];
#pragma unroll
  for (int i = 0; i < kLaneVecs; ++i) {
    const int64_t e = e0 + int64_t(group.lane + i * group.size) * kVec;
    const int64_t k = e / p.D;
    offset[i] = e < e1 ? k * plane + (e - k * p.D) : -1;
#pragma unroll
    for (int c = 0; c < kVec; ++c) acc[i][c] = acc_t(0);
  }
  for (int64_t q0 = start; q0 < end; q0 += kUnroll) {
    const scalar_t* src[kUnroll];
    acc_t scale[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      src[u] = nullptr;
      scale[u] = acc_t(0);
      if (q0 + u >= end) continue;
      const int32_t s = p.segments[q0 + u];
      if (s < 0 || s >= num_segments) continue;  // only after a fired assert (see file comment)
      int32_t slot = s;
      scale[u] = acc_t(1);
      if (p.segment_offsets != nullptr) {  // field-major s = f * B + b -> slot b * F + f
        const int32_t f = s / p.B, b = s - f * p.B;
        slot = b * p.F + f;
        if (p.mean) {  // the segment holds this lookup, so its length is >= 1
          scale[u] = acc_t(1) / acc_t(p.segment_offsets[s + 1] - p.segment_offsets[s]);
        }
      }
      src[u] = p.grad + int64_t(slot) * p.D;
    }
    vec_t values[kUnroll][kLaneVecs];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll lookups in flight
#pragma unroll
      for (int i = 0; i < kLaneVecs; ++i) {
        values[u][i] = src[u] != nullptr && offset[i] >= 0
                           ? load_vec<scalar_t, kVec>(src[u] + offset[i])
                           : zero_vec<scalar_t, kVec>();
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // summed in lookup order: deterministic
#pragma unroll
      for (int i = 0; i < kLaneVecs; ++i) {
#pragma unroll
        for (int c = 0; c < kVec; ++c) acc[i][c] += scale[u] * acc_t(values[u][i].v[c]);
      }
    }
  }
}

// out row elements [e0, e1) = acc (a gradient), or -= step * acc (an optimizer step).
template <typename scalar_t, int kVec, int kLaneVecs, bool kStep>
__device__ __forceinline__ void write_run(const Group& group, scalar_t* out_row, int64_t e0,
                                          int64_t e1,
                                          const at::opmath_type<scalar_t> (&acc)[kLaneVecs][kVec],
                                          const at::opmath_type<scalar_t> (&step)[kLaneVecs]) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, kVec>;
#pragma unroll
  for (int i = 0; i < kLaneVecs; ++i) {
    const int64_t e = e0 + int64_t(group.lane + i * group.size) * kVec;
    if (e >= e1) continue;
    vec_t value;
    if constexpr (kStep) {
      value = load_vec<scalar_t, kVec>(out_row + e);
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        value.v[c] = scalar_t(acc_t(value.v[c]) - step[i] * acc[i][c]);
      }
    } else {
#pragma unroll
      for (int c = 0; c < kVec; ++c) value.v[c] = scalar_t(acc[i][c]);
    }
    store_vec<scalar_t, kVec>(out_row + e, value);
  }
}

// Row-wise Adagrad for set k of row `row` given its gradient's sum of squares (identical in every
// lane): state[row, k] += sq / D, returns lr / (sqrt(state[row, k]) + eps). Lane 0 alone reads
// and writes the state, so no lane can see it half-updated.
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> adagrad_step(const ReduceParams<scalar_t>& p,
                                                                  const Group& group, int64_t row,
                                                                  int64_t k,
                                                                  at::opmath_type<scalar_t> sq) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t updated = acc_t(0);
  if (group.lane == 0) {
    acc_t* state = p.state + row * p.K + k;
    updated = *state + sq / acc_t(p.D);
    *state = updated;
  }
  updated = group.from_lane0(updated);
  return p.lr / (sqrt(updated) + p.eps);
}

// kFused = false: write each run's sum (dense or row gradient). kFused = true: apply SGD
// (state == nullptr) or row-wise Adagrad to the weight row.
template <typename scalar_t, int kVec, int kLaneVecs, bool kFused>
__global__ void __launch_bounds__(kBlockThreads) reduce_runs_kernel(const ReduceParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const Group group(p.group_size);
  const int64_t num_runs = *p.num_runs, KD = p.K * p.D;
  const int64_t pass_width = int64_t(group.size) * kVec * kLaneVecs;  // row values per pass
  acc_t acc[kLaneVecs][kVec];
  acc_t step[kLaneVecs];
  for (int64_t u = group.index; u < num_runs; u += group.stride()) {
    const int64_t row = p.run_rows[u];
    if (row < 0 || row >= p.num_rows) continue;  // bad ids' sentinel row (see build_lookups)
    const int64_t start = p.run_starts[u], end = start + p.run_lengths[u];
    scalar_t* out_row = p.out + (p.out_by_run ? u : row) * KD;

    if (!kFused || p.state == nullptr) {
      // A gradient or SGD: every element is independent, so any split of the row into passes
      // works.
#pragma unroll
      for (int i = 0; i < kLaneVecs; ++i) step[i] = p.lr;
      for (int64_t e0 = 0; e0 < KD; e0 += pass_width) {
        const int64_t e1 = std::min(KD, e0 + pass_width);
        accumulate_run<scalar_t, kVec, kLaneVecs>(p, group, start, end, e0, e1, acc);
        write_run<scalar_t, kVec, kLaneVecs, kFused>(group, out_row, e0, e1, acc, step);
      }
    } else if (p.D <= pass_width) {
      // Row-wise Adagrad, sets no wider than a pass: each pass holds whole sets, so a set's
      // statistic is complete before its values are updated.
      const int64_t span = pass_width / p.D * p.D;
      for (int64_t e0 = 0; e0 < KD; e0 += span) {
        const int64_t e1 = std::min(KD, e0 + span);
        accumulate_run<scalar_t, kVec, kLaneVecs>(p, group, start, end, e0, e1, acc);
        int64_t set_of[kLaneVecs];
#pragma unroll
        for (int i = 0; i < kLaneVecs; ++i) {
          const int64_t e = e0 + int64_t(group.lane + i * group.size) * kVec;
          set_of[i] = e < e1 ? e / p.D : -1;
        }
        for (int64_t k = e0 / p.D; k < e1 / p.D; ++k) {
          acc_t sq = acc_t(0);
#pragma unroll
          for (int i = 0; i < kLaneVecs; ++i) {
            if (set_of[i] != k) continue;
#pragma unroll
            for (int c = 0; c < kVec; ++c) sq += acc[i][c] * acc[i][c];
          }
          const acc_t step_k = adagrad_step(p, group, row, k, group.sum(sq));
#pragma unroll
          for (int i = 0; i < kLaneVecs; ++i) {
            if (set_of[i] == k) step[i] = step_k;
          }
        }
        write_run<scalar_t, kVec, kLaneVecs, true>(group, out_row, e0, e1, acc, step);
      }
    } else {
      // Row-wise Adagrad, sets wider than a pass: a first sweep over the set computes its
      // statistic, a second recomputes the sums and applies the step.
      for (int64_t k = 0; k < p.K; ++k) {
        acc_t sq = acc_t(0);
        for (int64_t e0 = k * p.D; e0 < (k + 1) * p.D; e0 += pass_width) {
          const int64_t e1 = std::min((k + 1) * p.D, e0 + pass_width);
          accumulate_run<scalar_t, kVec, kLaneVecs>(p, group, start, end, e0, e1, acc);
          acc_t partial = acc_t(0);
#pragma unroll
          for (int i = 0; i < kLaneVecs; ++i) {
#pragma unroll
            for (int c = 0; c < kVec; ++c) partial += acc[i][c] * acc[i][c];
          }
          sq += group.sum(partial);
        }
        const acc_t step_k = adagrad_step(p, group, row, k, sq);
#pragma unroll
        for (int i = 0; i < kLaneVecs; ++i) step[i] = step_k;
        for (int64_t e0 = k * p.D; e0 < (k + 1) * p.D; e0 += pass_width) {
          const int64_t e1 = std::min((k + 1) * p.D, e0 + pass_width);
          accumulate_run<scalar_t, kVec, kLaneVecs>(p, group, start, end, e0, e1, acc);
          write_run<scalar_t, kVec, kLaneVecs, true>(group, out_row, e0, e1, acc, step);
        }
      }
    }
  }
}

// Launches reduce_runs_kernel over at most max_runs runs (the exact count stays on the device).
template <bool kFused>
void launch_reduce_runs(const BackwardArgs& a, const SortedLookups& sorted, int64_t num_rows,
                        int64_t max_runs, const at::Tensor& out, bool out_by_run,
                        const at::Tensor* state, double lr, double eps, cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.grad.scalar_type(), "multi_embedding_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        ReduceParams<scalar_t> p;
        p.grad = a.grad.data_ptr<scalar_t>();
        p.segments = sorted.segments.data_ptr<int32_t>();
        p.run_rows = sorted.run_rows.data_ptr<int64_t>();
        p.run_starts = sorted.run_starts.data_ptr<int32_t>();
        p.run_lengths = sorted.run_lengths.data_ptr<int32_t>();
        p.num_runs = sorted.num_runs.data_ptr<int64_t>();
        p.segment_offsets = a.segment_offsets ? a.segment_offsets->data_ptr<int64_t>() : nullptr;
        p.B = int32_t(a.B);
        p.F = int32_t(a.F);
        p.K = a.K;
        p.D = a.D;
        p.num_rows = num_rows;
        p.mean = a.mean;
        p.out = out.data_ptr<scalar_t>();
        p.out_by_run = out_by_run;
        p.state = state != nullptr ? state->data_ptr<acc_t>() : nullptr;
        p.lr = acc_t(lr);
        p.eps = acc_t(eps);
        constexpr int kWide = 16 / int(sizeof(scalar_t));
        const bool wide = a.D % kWide == 0 && is_aligned(p.grad, 16) && is_aligned(p.out, 16);
        dispatch_row_layout<kWide>(wide, a.K * a.D, [&](auto vec_tag, auto lane_vecs_tag) {
          constexpr int kVec = decltype(vec_tag)::value;
          p.group_size = group_size_for((a.K * a.D + kVec - 1) / kVec);
          const dim3 grid = grid_for(max_runs, kBlockThreads / p.group_size);
          reduce_runs_kernel<scalar_t, kVec, decltype(lane_vecs_tag)::value, kFused>
              <<<grid, kBlockThreads, 0, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

// ---------------------------------------------------------------------------------------------
// The three backward ops

at::Tensor multi_embedding_backward_cuda(const at::Tensor& grad, const at::Tensor& indices,
                                         const std::optional<at::Tensor>& segment_offsets,
                                         const at::Tensor& table_offsets, int64_t pooling,
                                         int64_t num_rows) {
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const BackwardArgs a = prepare_backward(grad, indices, segment_offsets, table_offsets, pooling);
  TORCH_CHECK(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  auto grad_weight = at::zeros({num_rows, a.K, a.D}, grad.options());  // (N, K, D)
  if (a.nnz == 0) return grad_weight;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const SortedLookups sorted = sort_lookups(a, num_rows, stream);
  if (a.K * a.D > 0) {
    launch_reduce_runs<false>(a, sorted, num_rows, a.nnz, grad_weight, /*out_by_run=*/false,
                              nullptr, 0.0, 0.0, stream);
  }
  return grad_weight;
}

std::tuple<at::Tensor, at::Tensor> multi_embedding_backward_rows_cuda(
    const at::Tensor& grad, const at::Tensor& indices,
    const std::optional<at::Tensor>& segment_offsets, const at::Tensor& table_offsets,
    int64_t pooling) {
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const BackwardArgs a = prepare_backward(grad, indices, segment_offsets, table_offsets, pooling);
  if (a.nnz == 0) {
    return {at::empty({0}, table_offsets.options()), at::empty({0, a.K, a.D}, grad.options())};
  }
  // The output size is data-dependent, so this op syncs anyway; reading N here as well lets the
  // kernels check rows against it and sizes the sort.
  const int64_t num_rows = a.table_offsets[a.F].item<int64_t>();
  TORCH_CHECK(num_rows >= 0, "table_offsets[-1] must be >= 0, got ", num_rows);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const SortedLookups sorted = sort_lookups(a, num_rows, stream);
  const int64_t num_runs = sorted.num_runs.item<int64_t>();
  auto rows = sorted.run_rows.narrow(0, 0, num_runs);                  // (U,)
  auto row_grads = at::empty({num_runs, a.K, a.D}, grad.options());   // (U, K, D)
  if (a.K * a.D > 0) {
    launch_reduce_runs<false>(a, sorted, num_rows, num_runs, row_grads, /*out_by_run=*/true,
                              nullptr, 0.0, 0.0, stream);
  }
  return {rows, row_grads};
}

void multi_embedding_backward_fused_cuda(const at::Tensor& weight, const at::Tensor& state,
                                         const at::Tensor& grad, const at::Tensor& indices,
                                         const std::optional<at::Tensor>& segment_offsets,
                                         const at::Tensor& table_offsets, int64_t pooling,
                                         int64_t optimizer, double lr, double eps) {
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const BackwardArgs a = prepare_backward(grad, indices, segment_offsets, table_offsets, pooling);
  HMOE_CHECK_DIM(weight, 3);
  HMOE_CHECK_DEVICE(weight, grad.device());
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous (N, K, D), got strides ",
              weight.strides());
  TORCH_CHECK(weight.size(1) == a.K && weight.size(2) == a.D, "weight shape ", weight.sizes(),
              " does not match grad shape ", grad.sizes());
  HMOE_CHECK_DTYPE(grad, weight.scalar_type());
  TORCH_CHECK(optimizer == kFusedSGD || optimizer == kFusedRowWiseAdagrad,
              "optimizer must be 0 (SGD) or 1 (row-wise Adagrad), got ", optimizer);
  const bool adagrad = optimizer == kFusedRowWiseAdagrad;
  if (adagrad) {
    HMOE_CHECK_DEVICE(state, grad.device());
    TORCH_CHECK(state.dim() == 2 && state.size(0) == weight.size(0) && state.size(1) == a.K &&
                    state.is_contiguous(),
                "state must be a contiguous (N, K) = (", weight.size(0), ", ", a.K,
                ") tensor, got shape ", state.sizes(), " and strides ", state.strides());
    HMOE_CHECK_DTYPE(state, at::toOpMathType(weight.scalar_type()));
  }
  // weight.size(0) == table_offsets[-1] is checked on the device (build_lookups_kernel).
  if (a.nnz == 0 || a.K * a.D == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const SortedLookups sorted = sort_lookups(a, weight.size(0), stream);
  launch_reduce_runs<true>(a, sorted, weight.size(0), a.nnz, weight, /*out_by_run=*/false,
                           adagrad ? &state : nullptr, lr, eps, stream);
}

}  // namespace
}  // namespace hmoe

TORCH_LIBRARY_IMPL(hmoe, CUDA, m) {
  m.impl("multi_embedding", &hmoe::multi_embedding_cuda);
  m.impl("multi_embedding_backward", &hmoe::multi_embedding_backward_cuda);
  m.impl("multi_embedding_backward_rows", &hmoe::multi_embedding_backward_rows_cuda);
  m.impl("multi_embedding_backward_fused_", &hmoe::multi_embedding_backward_fused_cuda);
}
