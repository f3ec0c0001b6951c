// CUDA kernels of the MNSE digit-code embedding (math and shapes: hmoe/ops/mnse.py; mnse_cpu.cpp
// is the semantic twin of this file: same ops, checks and results).
//
// Digits: a sample's code is split into its digits once per block, by all threads together, into
// a small shared-memory tile: the row (0 <= row < R) each digit selects, or -1 in every slot of a
// missing code. Division by a power-of-two base is a shift; otherwise a 32-bit division while the
// code fits 32 bits. No (B, F, sum K_b) index tensor is formed in global memory. Bases, digit
// counts and block starts travel by value in a DigitSpec (at most kMaxBases bases).
//
// Forward: bound by the output write (each (sample, field) writes K runs of len(bases)*E or E
// values, the table is tiny). A 2-D tiling: blockIdx.y walks the fields, blockIdx.x tiles of
// samples of that field. The field's (R, K, E) table is staged in shared memory when it fits
// (kTableBytes), otherwise read through L1/L2. A thread owns one vector (16 bytes when E and the
// pointers allow it, else one value) of the E columns of one sample, loops over the K sets and
// the column groups (one per base in concat mode, one in sum mode), sums the selected rows in
// opmath registers in digit order (the CPU kernel's order) and stores the vector: consecutive
// threads write consecutive 16-byte pieces of each output run.
//
// Backward: every sample adds its gradient slices to the same few rows of its field, so the
// scatter is privatised. A block owns (chunk of samples, field, slice of the K*E columns) and
// sums into fp32 (opmath) accumulators of the slice's (R, slice) table in shared memory. A thread
// owns one (digit slot, column vector): the rows of one digit slot are distinct from the rows of
// every other slot, so no two threads ever touch the same accumulator, and the thread walks the
// samples in order: no atomics, and the order of every sum is fixed by the shapes alone. Narrow
// tables leave threads over, so the block keeps `replicas` copies of the table, copy p summing
// samples p, p + replicas, ...; copies are added in order when the block writes its partial
// (chunks, F, R, K, E) table. A second kernel adds the partials over the chunks in chunk order.
// Chunk size, slices and replicas depend only on B, F, R, K, E, dtype, the bases and whether grad
// is 16-byte aligned (never on the device or the launch), so results are bitwise reproducible. A field whose R rows do not fit even one vector
// column of accumulators in shared memory (R > 2560 with 16-byte fp32 vectors) falls back to
// adding straight into the block's zero-initialised partial in global memory, with the same
// ownership and order. The reduction writes every element of grad_weight.
//
// Bad input: the Python layer range-checks codes before a CUDA call, but the op is public, so
// the kernels guard every code: a code below -1 is reported (field, sample, code) with printf and
// fires a device-side assert (CUDA_KERNEL_ASSERT), as multi_embedding_cuda.cu explains, and adds
// nothing should asserts be compiled out. A code at or above b^K_b is written with its low K_b
// digits (the reference's behaviour); every digit is < b, so no row is ever out of bounds.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "hmoe/checks.h"
#include "hmoe/cuda_vec.h"

namespace hmoe {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kMaxBases = 8;
constexpr int64_t kMissing = -1;
constexpr int64_t kModeConcat = 0, kModeSum = 1;
// Shared memory per block: a table (forward) or accumulators (backward) plus the digit rows of a
// tile of samples, under the 48 KiB that a launch gets without opting in.
constexpr int64_t kTableBytes = 40 * 1024;
constexpr int64_t kDigitBytes = 8 * 1024;
constexpr int64_t kMaxTile = 256;                      // samples whose digits are staged at once
constexpr int64_t kMinChunk = 256;                     // samples per backward partial, at least
constexpr int64_t kMaxPartials = 2048;                 // chunks * F * slices, at most
constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;
constexpr int kMaxReplicas = 32;

// Bases, digit counts and where their rows and digit slots start, by value in kernel arguments.
struct DigitSpec {
  int num_bases;
  int total_digits;             // S = sum of num_digits
  int rows;                     // R = sum of base * num_digits
  int base[kMaxBases];
  int num_digits[kMaxBases];
  int shift[kMaxBases];         // log2(base) for a power of two, else -1
  int start[kMaxBases];         // first row of base j's block
  int first_digit[kMaxBases];   // first digit slot of base j
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % uintptr_t(bytes) == 0;
}

// ---------------------------------------------------------------------------------------------
// Vectors

// Vec, load_vec, store_vec: hmoe/cuda_vec.h.

// dst[0 .. kVec) += x, in pieces of at most 16 bytes of accumulators (dst is aligned to
// kVec accumulators).
template <typename acc_t, typename scalar_t, int kVec>
__device__ __forceinline__ void add_vec(acc_t* dst, const Vec<scalar_t, kVec>& x) {
  constexpr int kPiece = kVec * int(sizeof(acc_t)) > 16 ? 16 / int(sizeof(acc_t)) : kVec;
#pragma unroll
  for (int c0 = 0; c0 < kVec; c0 += kPiece) {
    Vec<acc_t, kPiece> sum = load_vec<acc_t, kPiece>(dst + c0);
#pragma unroll
    for (int c = 0; c < kPiece; ++c) sum.v[c] += acc_t(x.v[c0 + c]);
    store_vec<acc_t, kPiece>(dst + c0, sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Digits

// Code of (sample b, field f), or kMissing after reporting a code below -1. Only the reporting
// thread prints; every thread that sees it asserts.
template <typename index_t>
__device__ __forceinline__ int64_t checked_code(const index_t* __restrict__ codes, int64_t b,
                                                int64_t f, int64_t F, bool report) {
  const int64_t v = int64_t(codes[b * F + f]);
  if (v >= kMissing) return v;
  if (report) {
    printf("hmoe.mnse (CUDA): codes: field %lld (sample %lld) has code %lld, below 0 (-1 marks "
           "a missing value)\n",
           (long long)f, (long long)b, (long long)v);
  }
  CUDA_KERNEL_ASSERT(false && "hmoe.mnse: code below -1");
  return kMissing;
}

// Rows selected by the K_j digits of base j of code v >= 0, into rows[first_digit[j] ...].
// Digit d with value x selects row start_j + d * b + x: always inside base j's block.
__device__ __forceinline__ void write_digit_rows(uint64_t v, int j, const DigitSpec& spec,
                                                 int32_t* rows) {
  const int n = spec.num_digits[j], b = spec.base[j], start = spec.start[j];
  const int shift = spec.shift[j];
  int32_t* out = rows + spec.first_digit[j];
  if (shift >= 0) {
    const uint64_t mask = uint64_t(b) - 1;
    for (int d = 0; d < n; ++d, v >>= shift) out[d] = start + d * b + int(v & mask);
  } else {
    for (int d = 0; d < n; ++d) {
      const uint64_t q = v <= 0xffffffffull ? uint64_t(uint32_t(v) / uint32_t(b)) : v / uint64_t(b);
      out[d] = start + d * b + int(v - q * uint64_t(b));
      v = q;
    }
  }
}

// Digit rows of samples [b0, b0 + n) of field f into rows (n, S), -1 in every slot of a missing
// or invalid code. Every thread of the block takes part, one (sample, base) pair at a time.
template <typename index_t>
__device__ __forceinline__ void stage_digit_rows(const index_t* __restrict__ codes, int64_t b0,
                                                 int n, int64_t f, int64_t F,
                                                 const DigitSpec& spec, int32_t* rows) {
  const int nb = spec.num_bases, S = spec.total_digits;
  for (int x = threadIdx.x; x < n * nb; x += blockDim.x) {
    const int i = x / nb, j = x - i * nb;
    const int64_t v = checked_code(codes, b0 + i, f, F, j == 0);
    int32_t* sample_rows = rows + int64_t(i) * S;
    if (v == kMissing) {
      for (int d = 0; d < spec.num_digits[j]; ++d) sample_rows[spec.first_digit[j] + d] = -1;
    } else {
      write_digit_rows(uint64_t(v), j, spec, sample_rows);
    }
  }
}

// Base whose digits occupy slot s.
__device__ __forceinline__ int base_of_slot(const DigitSpec& spec, int s) {
  int j = 0;
  while (j + 1 < spec.num_bases && s >= spec.first_digit[j + 1]) ++j;
  return j;
}

// ---------------------------------------------------------------------------------------------
// Forward

struct ForwardArgs {
  int64_t B, F, K, E;
  int64_t width;    // output columns per (k, b, f): len(bases) * E (concat) or E (sum)
  bool concat;
  int tile;         // samples per tile
  int rows_offset;  // bytes of shared memory before the digit rows (the staged table)
};

// out (K, B, F, width). Block: field blockIdx.y (+ gridDim.y ...), tiles blockIdx.x
// (+ gridDim.x ...) of `tile` samples. Thread: one vector of E columns of one sample, all sets
// and column groups.
template <typename scalar_t, typename index_t, int kVec, bool kSharedTable>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(
    const scalar_t* __restrict__ weight, const index_t* __restrict__ codes,
    scalar_t* __restrict__ out, const DigitSpec spec, const ForwardArgs a) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, kVec>;
  // Offsets into the shared table fit in int; the global table may be large.
  using off_t = std::conditional_t<kSharedTable, int, int64_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* sm_table = reinterpret_cast<scalar_t*>(smem);
  int32_t* sm_rows = reinterpret_cast<int32_t*>(smem + a.rows_offset);

  const int S = spec.total_digits;
  const int groups = a.concat ? spec.num_bases : 1;
  const off_t E = off_t(a.E), KE = off_t(a.K * a.E);
  const int64_t table_size = int64_t(spec.rows) * a.K * a.E;  // one field's (R, K, E)
  const int64_t plane = a.B * a.F * a.width;                  // one output set (B, F, width)
  const int vecs = int(a.E / kVec);
  const int64_t num_tiles = ceil_div(a.B, a.tile);

  for (int64_t f = blockIdx.y; f < a.F; f += gridDim.y) {
    if (kSharedTable) {
      __syncthreads();  // the previous field's table is no longer read
      const scalar_t* src = weight + f * table_size;
      for (int64_t x = int64_t(threadIdx.x) * kVec; x < table_size;
           x += int64_t(blockDim.x) * kVec) {
        store_vec<scalar_t, kVec>(sm_table + x, load_vec<scalar_t, kVec>(src + x));
      }
      // Visible to all threads after the barrier that follows the digit stage below.
    }
    const scalar_t* table = kSharedTable ? sm_table : weight + f * table_size;

    for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
      const int64_t b0 = t * a.tile;
      const int n = int(a.B - b0 < a.tile ? a.B - b0 : a.tile);
      __syncthreads();  // the previous tile's digit rows are no longer read
      stage_digit_rows(codes, b0, n, f, a.F, spec, sm_rows);
      __syncthreads();

      for (int p = threadIdx.x; p < n * vecs; p += blockDim.x) {
        const int i = p / vecs;
        const off_t e = off_t(p - i * vecs) * kVec;
        const int32_t* rows = sm_rows + i * S;
        const bool missing = rows[0] < 0;
        scalar_t* dst = out + ((b0 + i) * a.F + f) * a.width + e;  // out[0, b, f, e]
        for (int64_t k = 0; k < a.K; ++k, dst += plane) {
          const scalar_t* src = table + off_t(k) * E + e;  // table[0, k, e]
          for (int g = 0; g < groups; ++g) {
            const int s0 = a.concat ? spec.first_digit[g] : 0;
            const int s1 = missing ? s0 : a.concat ? s0 + spec.num_digits[g] : S;
            acc_t acc[kVec];
#pragma unroll
            for (int c = 0; c < kVec; ++c) acc[c] = acc_t(0);
#pragma unroll 4
            for (int s = s0; s < s1; ++s) {
              const vec_t w = load_vec<scalar_t, kVec>(src + off_t(rows[s]) * KE);
#pragma unroll
              for (int c = 0; c < kVec; ++c) acc[c] += acc_t(w.v[c]);
            }
            vec_t value;
#pragma unroll
            for (int c = 0; c < kVec; ++c) value.v[c] = scalar_t(acc[c]);
            store_vec<scalar_t, kVec>(dst + g * E, value);
          }
        }
      }
    }
  }
}

// Blocks that keep every SM busy for one wave of the forward.
int64_t resident_blocks() {
  return int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
         (2048 / kBlockThreads);
}

template <typename scalar_t, typename index_t>
void launch_forward(const at::Tensor& weight, const at::Tensor& codes, const at::Tensor& out,
                    const DigitSpec& spec, ForwardArgs a, cudaStream_t stream) {
  constexpr int kWide = 16 / int(sizeof(scalar_t));
  const bool wide =
      a.E % kWide == 0 && is_aligned(weight.data_ptr(), 16) && is_aligned(out.data_ptr(), 16);
  const int64_t vec = wide ? kWide : 1, vecs = a.E / vec;
  const int64_t table_bytes = int64_t(spec.rows) * a.K * a.E * int64_t(sizeof(scalar_t));
  const bool shared = table_bytes <= kTableBytes;
  // About two positions per thread, within the digit budget.
  int64_t tile = std::min<int64_t>(ceil_div(2 * kBlockThreads, vecs), kMaxTile);
  tile = std::min({tile, kDigitBytes / (4 * int64_t(spec.total_digits)), a.B});
  tile = std::max<int64_t>(1, tile);
  TORCH_CHECK(tile * vecs <= INT_MAX, "hmoe.mnse (CUDA): E = ", a.E, " is too large");
  a.tile = int(tile);
  a.rows_offset = shared ? int(ceil_div(table_bytes, 16) * 16) : 0;
  const size_t smem_bytes = size_t(a.rows_offset) + size_t(tile * spec.total_digits * 4);

  const int64_t fields = std::min<int64_t>(a.F, 65535);
  const int64_t tiles = ceil_div(a.B, tile);
  const int64_t per_field = std::max<int64_t>(1, ceil_div(resident_blocks(), fields));
  const dim3 grid(unsigned(std::min(tiles, per_field)), unsigned(fields));
  auto launch = [&](auto vec_tag, auto shared_tag) {
    forward_kernel<scalar_t, index_t, decltype(vec_tag)::value, decltype(shared_tag)::value>
        <<<grid, kBlockThreads, smem_bytes, stream>>>(weight.data_ptr<scalar_t>(),
                                                      codes.data_ptr<index_t>(),
                                                      out.data_ptr<scalar_t>(), spec, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using Wide = std::integral_constant<int, kWide>;
  using One = std::integral_constant<int, 1>;
  if (wide) {
    shared ? launch(Wide{}, std::true_type{}) : launch(Wide{}, std::false_type{});
  } else {
    shared ? launch(One{}, std::true_type{}) : launch(One{}, std::false_type{});
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, step 1: per-block partial tables

struct BackwardArgs {
  int64_t B, F, K, E, KE;
  int64_t width;      // grad columns per (k, b, f)
  bool concat;
  int64_t chunk;      // samples per partial
  int64_t slice;      // accumulator columns (of the K*E) per block; KE on the global path
  int tile;           // samples whose digit rows are staged at once
  int replicas;       // copies of the accumulators in shared memory
  int replica_threads;
  int rows_offset;    // bytes of shared memory before the digit rows (the accumulators)
};

// partial (chunks, F, R, K*E) in opmath. Block: chunk blockIdx.x, field blockIdx.y
// (+ gridDim.y ...), columns [blockIdx.z * slice, + slice) of the K*E. Thread: replica
// threadIdx.x / replica_threads and (digit slot, column vector) positions threadIdx.x %
// replica_threads (+ replica_threads ...).
template <typename scalar_t, typename index_t, int kVec, bool kShared>
__global__ void __launch_bounds__(kBlockThreads) backward_partial_kernel(
    const scalar_t* __restrict__ grad, const index_t* __restrict__ codes,
    at::opmath_type<scalar_t>* __restrict__ partial, const DigitSpec spec, const BackwardArgs a) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, kVec>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* sm_acc = reinterpret_cast<acc_t*>(smem);  // (replicas, R, slice)
  int32_t* sm_rows = reinterpret_cast<int32_t*>(smem + a.rows_offset);

  const int S = spec.total_digits, R = spec.rows;
  const int64_t chunk_begin = int64_t(blockIdx.x) * a.chunk;
  const int64_t chunk_end = a.B - chunk_begin < a.chunk ? a.B : chunk_begin + a.chunk;
  const int64_t col0 = int64_t(blockIdx.z) * a.slice;
  const int64_t cols = a.KE - col0 < a.slice ? a.KE - col0 : a.slice;  // this block's columns
  const int64_t vecs = cols / kVec, positions = int64_t(S) * vecs;
  const int replica = int(threadIdx.x) / a.replica_threads;
  const int64_t first_position = int(threadIdx.x) - replica * a.replica_threads;
  const int64_t plane = a.B * a.F * a.width, sample_stride = a.F * a.width;
  const int64_t acc_stride = kShared ? a.slice : a.KE;  // between accumulator rows

  for (int64_t f = blockIdx.y; f < a.F; f += gridDim.y) {
    acc_t* field_partial = partial + (int64_t(blockIdx.x) * a.F + f) * R * a.KE;  // (R, K*E)
    // This thread's accumulators: its replica's copy in shared memory, else the partial.
    acc_t* acc = kShared ? sm_acc + int64_t(replica < a.replicas ? replica : 0) * R * a.slice
                         : field_partial;
    if (kShared) {
      __syncthreads();  // the previous field's sums have been written out
      for (int64_t x = threadIdx.x; x < int64_t(a.replicas) * R * a.slice; x += blockDim.x) {
        sm_acc[x] = acc_t(0);
      }
    }
    for (int64_t b0 = chunk_begin; b0 < chunk_end; b0 += a.tile) {
      const int n = int(chunk_end - b0 < a.tile ? chunk_end - b0 : a.tile);
      __syncthreads();  // zeroing done; the previous tile's digit rows are no longer read
      stage_digit_rows(codes, b0, n, f, a.F, spec, sm_rows);
      __syncthreads();
      if (replica >= a.replicas) continue;
      for (int64_t pos = first_position; pos < positions; pos += a.replica_threads) {
        const int s = int(pos / vecs);
        const int64_t col = (pos - s * vecs) * kVec;  // within the block's columns
        const int64_t k = (col0 + col) / a.E, e = col0 + col - k * a.E;
        const int64_t j = a.concat ? base_of_slot(spec, s) : 0;
        // grad[k, b0, f, j * E + e]; sample i adds i * sample_stride.
        const scalar_t* g = grad + k * plane + b0 * sample_stride + f * a.width + j * a.E + e;
        acc_t* column = acc + (kShared ? col : col0 + col);
#pragma unroll 4
        for (int i = replica; i < n; i += a.replicas) {
          const int32_t row = sm_rows[i * S + s];
          if (row < 0) continue;  // missing code
          const vec_t value = load_vec<scalar_t, kVec>(g + i * sample_stride);
          add_vec<acc_t, scalar_t, kVec>(column + row * acc_stride, value);
        }
      }
    }
    if (kShared) {
      __syncthreads();  // all sums of this field are in
      for (int64_t x = threadIdx.x; x < R * cols; x += blockDim.x) {
        const int64_t row = x / cols, col = x - row * cols;
        acc_t sum = sm_acc[row * a.slice + col];
        for (int p = 1; p < a.replicas; ++p) sum += sm_acc[(int64_t(p) * R + row) * a.slice + col];
        field_partial[row * a.KE + col0 + col] = sum;
      }
    }
  }
}

// Backward, step 2: grad_weight[x] = sum over chunks c, in order, of partial[c, x].
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads) reduce_partials_kernel(
    const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ grad_weight,
    int64_t size, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; x < size;
       x += int64_t(gridDim.x) * blockDim.x) {
    acc_t sum = partial[x];
    for (int64_t c = 1; c < chunks; ++c) sum += partial[c * size + x];
    grad_weight[x] = scalar_t(sum);
  }
}

template <typename scalar_t, typename index_t>
void launch_backward(const at::Tensor& grad, const at::Tensor& codes, const at::Tensor& grad_weight,
                     const DigitSpec& spec, BackwardArgs a, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWide = 16 / int(sizeof(scalar_t));
  const bool wide = a.E % kWide == 0 && is_aligned(grad.data_ptr(), 16);
  const int64_t vec = wide ? kWide : 1, R = spec.rows, S = spec.total_digits;
  const int64_t acc_bytes = sizeof(acc_t);

  // Columns per block: as many vectors as R rows of accumulators allow, balanced over slices.
  const int64_t max_slice = kTableBytes / (R * acc_bytes) / vec * vec;
  bool shared = max_slice >= vec;
  int64_t slices = shared ? ceil_div(a.KE, max_slice) : 1;
  if (slices > 65535) shared = false, slices = 1;
  a.slice = shared ? ceil_div(ceil_div(a.KE, slices), vec) * vec : a.KE;
  // Replicas for the threads that one copy leaves idle.
  const int64_t positions = S * (a.slice / vec);
  a.replicas = 1;
  a.replica_threads = kBlockThreads;
  if (shared && positions < kBlockThreads) {
    a.replicas = int(std::max<int64_t>(
        1, std::min<int64_t>({kBlockThreads / positions, kTableBytes / (R * a.slice * acc_bytes),
                              kMaxReplicas})));
    a.replica_threads = int(positions);
  }
  a.tile = int(std::max<int64_t>(1, std::min(kDigitBytes / (4 * S), kMaxTile)));
  const int64_t acc_total_bytes = int64_t(a.replicas) * R * a.slice * acc_bytes;
  a.rows_offset = shared ? int(ceil_div(acc_total_bytes, 16) * 16) : 0;
  const size_t smem_bytes = size_t(a.rows_offset) + size_t(int64_t(a.tile) * S * 4);

  // Chunks: a function of the shapes only (determinism), enough blocks to fill a GPU, a bounded
  // partial buffer.
  const int64_t table_bytes = a.F * R * a.KE * acc_bytes;  // one partial (F, R, K, E)
  const int64_t max_chunks = std::max<int64_t>(
      1, std::min(kMaxPartials / (a.F * slices), kMaxPartialBytes / table_bytes));
  a.chunk = std::max(kMinChunk, ceil_div(a.B, max_chunks));
  const int64_t chunks = ceil_div(a.B, a.chunk);
  TORCH_CHECK(chunks <= INT_MAX, "hmoe.mnse_backward (CUDA): too many chunks");
  auto options = grad.options().dtype(at::toOpMathType(grad.scalar_type()));
  // The shared path writes every element of its partials; the global path adds into them.
  auto partial = shared ? at::empty({chunks, a.F, R, a.KE}, options)
                        : at::zeros({chunks, a.F, R, a.KE}, options);

  const dim3 grid(unsigned(chunks), unsigned(std::min<int64_t>(a.F, 65535)), unsigned(slices));
  auto launch = [&](auto vec_tag, auto shared_tag) {
    backward_partial_kernel<scalar_t, index_t, decltype(vec_tag)::value,
                            decltype(shared_tag)::value>
        <<<grid, kBlockThreads, smem_bytes, stream>>>(grad.data_ptr<scalar_t>(),
                                                      codes.data_ptr<index_t>(),
                                                      partial.data_ptr<acc_t>(), spec, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using Wide = std::integral_constant<int, kWide>;
  using One = std::integral_constant<int, 1>;
  if (wide) {
    shared ? launch(Wide{}, std::true_type{}) : launch(Wide{}, std::false_type{});
  } else {
    shared ? launch(One{}, std::true_type{}) : launch(One{}, std::false_type{});
  }

  const int64_t size = grad_weight.numel();
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(size, kBlockThreads),
                                                       4 * resident_blocks()));
  reduce_partials_kernel<scalar_t><<<unsigned(blocks), kBlockThreads, 0, stream>>>(
      partial.data_ptr<acc_t>(), grad_weight.data_ptr<scalar_t>(), size, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Host side: checks (the CPU kernel's, plus the CUDA kernel's limits) and the two ops

DigitSpec make_spec(at::IntArrayRef bases, at::IntArrayRef num_digits) {
  TORCH_CHECK_VALUE(!bases.empty() && bases.size() == num_digits.size(),
                    "bases and num_digits must be non-empty and of one length, got ", bases,
                    " and ", num_digits);
  TORCH_CHECK_VALUE(bases.size() <= size_t(kMaxBases), "the CUDA kernels of hmoe.mnse take at "
                    "most ", kMaxBases, " bases, got ", bases.size(), ": ", bases);
  DigitSpec spec{};
  spec.num_bases = int(bases.size());
  int64_t rows = 0, digits = 0;
  for (size_t j = 0; j < bases.size(); ++j) {
    TORCH_CHECK_VALUE(bases[j] >= 2 && num_digits[j] >= 1 && num_digits[j] <= 64,
                      "bases must be >= 2 and num_digits in [1, 64], got ", bases, " and ",
                      num_digits);
    TORCH_CHECK_VALUE(bases[j] <= INT_MAX, "the CUDA kernels of hmoe.mnse take bases below 2^31, "
                      "got ", bases);
    spec.base[j] = int(bases[j]);
    spec.num_digits[j] = int(num_digits[j]);
    spec.shift[j] = (bases[j] & (bases[j] - 1)) == 0 ? bits_for(bases[j]) : -1;
    spec.start[j] = int(std::min<int64_t>(rows, INT_MAX));
    spec.first_digit[j] = int(digits);
    rows += bases[j] * num_digits[j];
    digits += num_digits[j];
  }
  TORCH_CHECK_VALUE(rows <= INT_MAX, "the CUDA kernels of hmoe.mnse take at most 2^31 - 1 rows "
                    "per field (R = sum of bases * num_digits), got ", rows);
  spec.rows = int(rows);
  spec.total_digits = int(digits);
  return spec;
}

void check_codes(const at::Tensor& codes, const at::Tensor& like) {
  HMOE_CHECK_INDEX_DTYPE(codes);
  HMOE_CHECK_DIM(codes, 2);
  HMOE_CHECK_DEVICE(codes, like.device());
}

void check_mode(int64_t mode) {
  TORCH_CHECK_VALUE(mode == kModeConcat || mode == kModeSum,
                    "mode must be 0 (concat) or 1 (sum), got ", mode);
}

at::Tensor mnse_cuda(const at::Tensor& weight_in, const at::Tensor& codes_in,
                     at::IntArrayRef bases, at::IntArrayRef num_digits, int64_t mode) {
  const DigitSpec spec = make_spec(bases, num_digits);
  HMOE_CHECK_DIM(weight_in, 4);
  TORCH_CHECK(weight_in.is_cuda(), "weight must be a CUDA tensor, got ", weight_in.device());
  check_codes(codes_in, weight_in);
  check_mode(mode);
  const int64_t F = weight_in.size(0), K = weight_in.size(2), E = weight_in.size(3);
  TORCH_CHECK_VALUE(weight_in.size(1) == spec.rows, "weight has ", weight_in.size(1),
                    " rows per field but bases ", bases, " with num_digits ", num_digits,
                    " need ", spec.rows);
  TORCH_CHECK_VALUE(codes_in.size(1) == F, "codes must be (B, F=", F, "), got shape ",
                    codes_in.sizes());
  const c10::cuda::CUDAGuard device_guard(weight_in.device());
  const int64_t B = codes_in.size(0);
  const bool concat = mode == kModeConcat;
  const int64_t width = concat ? spec.num_bases * E : E;
  const at::Tensor weight = weight_in.contiguous(), codes = codes_in.contiguous();
  auto out = at::empty({K, B, F, width}, weight.options());  // (K, B, F, width)
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ForwardArgs a{B, F, K, E, width, concat, 0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "mnse_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "mnse_cuda", [&] {
      launch_forward<scalar_t, index_t>(weight, codes, out, spec, a, stream);
    });
  });
  return out;
}

at::Tensor mnse_backward_cuda(const at::Tensor& grad_in, const at::Tensor& codes_in,
                              at::IntArrayRef bases, at::IntArrayRef num_digits, int64_t mode) {
  const DigitSpec spec = make_spec(bases, num_digits);
  HMOE_CHECK_DIM(grad_in, 4);
  TORCH_CHECK(grad_in.is_cuda(), "grad must be a CUDA tensor, got ", grad_in.device());
  check_codes(codes_in, grad_in);
  check_mode(mode);
  const int64_t K = grad_in.size(0), B = codes_in.size(0), F = codes_in.size(1);
  const int64_t nb = spec.num_bases;
  const bool concat = mode == kModeConcat;
  TORCH_CHECK_VALUE(grad_in.size(1) == B && grad_in.size(2) == F, "grad must be (K, B=", B,
                    ", F=", F, ", ·), got shape ", grad_in.sizes());
  TORCH_CHECK_VALUE(!concat || grad_in.size(3) % nb == 0, "grad's last dim (", grad_in.size(3),
                    ") must be len(bases) * E in mode concat");
  const int64_t width = grad_in.size(3), E = concat ? width / nb : width;
  const c10::cuda::CUDAGuard device_guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), codes = codes_in.contiguous();
  if (grad.numel() == 0 || F * K * E == 0) {
    return at::zeros({F, spec.rows, K, E}, grad.options());  // no sample: no gradient
  }
  auto grad_weight = at::empty({F, spec.rows, K, E}, grad.options());  // (F, R, K, E)
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const BackwardArgs a{B, F, K, E, K * E, width, concat, 0, 0, 0, 0, 0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "mnse_backward_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "mnse_backward_cuda", [&] {
          launch_backward<scalar_t, index_t>(grad, codes, grad_weight, spec, a, stream);
        });
      });
  return grad_weight;
}

}  // namespace
}  // namespace hmoe

TORCH_LIBRARY_IMPL(hmoe, CUDA, m) {
  m.impl("mnse", &hmoe::mnse_cuda);
  m.impl("mnse_backward", &hmoe::mnse_backward_cuda);
}
