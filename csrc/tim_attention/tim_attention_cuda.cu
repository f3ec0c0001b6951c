// CUDA kernels of TIM target attention (math, shapes and dtypes: hmoe/ops/tim_attention.py, whose
// float64 tim_attention_ref / tim_attention_backward_ref are the spec; tim_attention_cpu.cpp
// implements the same ops and checks on the CPU).
//
// Forward: the target is factored out of the values (u = ṽ ⊙ m), so a sample needs its
// behaviour rows once and keeps only α (B, H, L) and m (B, D). A block of 128 threads owns one
// chunk of one sample: the whole sequence when L <= kChunk (256) steps, else one of ceil(L / 256)
// chunks. The block first stages the chunk's row numbers (ids[b, i], or b·L + i pre-gathered)
// and positions in shared memory, reading ids and positions at valid steps only (padding is
// never read: it may hold NaN or ids out of range), then walks the chunk in tiles of R steps
// (R <= 64, a power of two chosen by D and H so that a tile fits kTileBytes):
//   A. every thread loads vectors of the tile's rows (16 bytes where D, the row stride and the
//      pointers allow it, else one value), kUnroll row loads in flight, adds its position's PE
//      vector (a small, cache-resident table) and stores ẽ = e + PE[p] in opmath (fp32, fp64
//      for fp64) in shared memory: the id and position gathers are fused, each row is read once;
//   B. per (step, head) pair a sub-warp of `sub` lanes (a power of two, by Dh) forms the score
//      s = ⟨ẽ^h, ṽ^h⟩ / sqrt(Dh) with a butterfly sum, and writes it raw into alpha;
//   C. a warp per head updates the online softmax: running max, rescale factor, sum of exp;
//   D. the block's threads split the tile's elements (vectors) and rows; each sums p·ẽ over its
//      rows, and the row splits are added in a fixed order into the running m (rescaled).
// __launch_bounds__ keeps fp32 blocks at 64 registers a thread so that 8 blocks share an SM
// (B = 1024 one-chunk sequences are one wave on an H200). Every order of summation is fixed by
// the shapes alone, never by scheduling: the results are bitwise reproducible. A one-chunk
// block then normalises m and its alpha entries and writes out = ṽ ⊙ m; a chunked sequence
// writes its (max, sum of exp, unnormalised m) per head, and a second kernel (one block per
// sample) combines the chunks in order with a log-sum-exp and normalises alpha. A sample of
// length 0 gives out = m = α = 0.
//
// Backward: the same blocks and tiles recompute ẽ (rows + PE gathers, again reading valid steps
// only), read α, and form per (step, head) ds' = c·α(⟨dm^h, ẽ^h⟩ − ⟨dm^h, m^h⟩) with
// dm = g ⊙ ṽ + g_m; then dẽ = α dm + ds'·ṽ is written to grad_rows (zeros at padding) and
// Σ ds'·ẽ is accumulated in a fixed order, giving dṽ = g ⊙ m + Σ ds'·ẽ (chunks are added in
// order by a small second kernel).
//
// Position gradient, deterministically: row p of grad_position_embedding sums dẽ over the valid
// steps at position p, and row 0 sums dṽ over the samples. Every step (key: its position, or
// P + 1 at padding) and every target (key 0) is an item; a stable CUB radix sort groups the items
// by key (stable: each key's items stay in input order), a kernel records where each key's run
// starts and ends, and fixed pieces of kPiece sorted items are summed by one thread group each,
// in order, from the fp32 per-step gradients (grad_rows itself for fp32 / fp64, a scratch copy
// for bf16 / fp16) and the fp32 dṽ: a run inside one piece is written directly, a run spanning
// pieces leaves its first piece's tail and the following pieces' heads, which a last kernel adds
// in piece order. No floating-point atomics anywhere: same inputs, same bits.
//
// Bad input: the Python layer range-checks lengths, ids and positions before a CUDA call, but the
// ops are public, so the kernels guard them: an id outside [0, N), a position outside [1, P] at
// a valid step, or a length outside [0, L] is printed and fires a device-side assert
// (CUDA_KERNEL_ASSERT; see multi_embedding_cuda.cu for why not an error flag); should asserts be
// compiled out, the bad row or PE row reads as zeros and the length is clamped, nothing out of
// bounds is ever read.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include "hmoe/checks.h"
#include "hmoe/cuda_vec.h"

namespace hmoe {
namespace {

// ==== device code: begin (kernels and the launch geometry they share with the host) ===========

constexpr int kBlockThreads = 128;       // chunk and combine kernels
// Chunk kernels resident per SM (register budget): 8 (64 registers a thread) for fp32, whose
// B = 1024 sequences then fit one wave on an H100/H200; 6 for the wider opmath arrays of
// fp64 and of 8-wide bf16 / fp16 vectors, which would spill under 64.
template <typename scalar_t>
constexpr int min_blocks() {
  return std::is_same_v<scalar_t, float> ? 8 : 6;
}
constexpr int kGroupThreads = 256;       // position-gradient kernels
constexpr int kWarpSize = 32;
constexpr int64_t kChunk = 256;          // steps per block when a sequence is split
constexpr int kMaxTile = 64;             // steps per tile, at most
constexpr int64_t kTileBytes = 24 * 1024;  // shared memory of a tile (ẽ and per-head values)
constexpr int kUnroll = 4;               // loads issued before any is consumed
constexpr int64_t kPiece = 32;           // sorted items per position-gradient piece

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shapes and launch geometry of one call; everything is a function of the shapes and dtypes only
// (never of the device), so every order of summation is too.
struct TimShape {
  int64_t B, L, D, H, Dh;  // batch, steps, dim, heads, dim per head
  int64_t N, P;            // rows of `rows`, largest position (PE has P + 1 rows)
  int64_t row_stride;      // elements between rows of `rows`
  int64_t chunk;           // steps per chunk (Cs)
  int64_t num_chunks;      // chunks per sample (C)
  int tile;                // steps per tile (R)
  int sub;                 // lanes per (step, head) dot product: a power of two <= 32
  int et;                  // threads along the elements in the per-element phase
  int rs;                  // row splits in the per-element phase (et * rs <= kBlockThreads)
};

// Byte offsets into a chunk kernel's dynamic shared memory (see forward/backward_layout).
struct SmemLayout {
  int v;      // ṽ (D)
  int x;      // forward: running m (D); backward: dm (D)
  int y;      // backward: Σ ds'·ẽ (D)
  int e;      // ẽ of the tile (R, D)
  int s1;     // forward: scores, then probabilities (H, R); backward: α (H, R)
  int s2;     // backward: ds' (H, R)
  int heads;  // forward: running max, sum of exp, rescale factor (3, H); backward: ⟨dm, m⟩ (H)
  int part;   // per-row-split partial sums (rs, D)
  int row;    // the chunk's row numbers (Cs) int64
  int pos;    // the chunk's positions (Cs) int32
  int bytes;  // total
};

// Vec, load_vec, store_vec, zero_vec: hmoe/cuda_vec.h.

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

// Butterfly reductions over a full warp: every lane ends with the same bits.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = max_acc(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Device-side checks (see the file comment for why they assert)

// lengths[b], clamped to [0, L] after reporting a length outside it (report: one thread).
__device__ __forceinline__ int64_t checked_length(const int64_t* __restrict__ lengths, int64_t b,
                                                  int64_t L, bool report) {
  const int64_t len = lengths[b];
  if (len >= 0 && len <= L) return len;
  if (report) {
    printf("hmoe.tim_attention (CUDA): lengths[%lld] = %lld is outside [0, L = %lld]\n",
           (long long)b, (long long)len, (long long)L);
  }
  CUDA_KERNEL_ASSERT(false && "hmoe.tim_attention: length out of range");
  return len < 0 ? 0 : L;
}

// Stages the row number and position of the chunk's valid steps [c0, v1) of sample b into
// row[i - c0], pos[i - c0]; a bad id or position is reported and becomes -1 (reads as zeros).
template <typename index_t>
__device__ __forceinline__ void stage_steps(const index_t* __restrict__ ids,
                                            const index_t* __restrict__ positions, int64_t b,
                                            int64_t c0, int64_t v1, const TimShape& s,
                                            int64_t* row, int32_t* pos) {
  for (int64_t i = c0 + threadIdx.x; i < v1; i += blockDim.x) {
    const int64_t step = b * s.L + i;
    int64_t r = step;  // pre-gathered: N == B * L
    if (ids != nullptr) {
      r = int64_t(ids[step]);
      if (r < 0 || r >= s.N) {
        printf("hmoe.tim_attention (CUDA): ids[%lld, %lld] = %lld is outside [0, %lld) (the "
               "rows)\n",
               (long long)b, (long long)i, (long long)r, (long long)s.N);
        CUDA_KERNEL_ASSERT(false && "hmoe.tim_attention: id out of range");
        r = -1;
      }
    }
    int64_t p = int64_t(positions[step]);
    if (p < 1 || p > s.P) {
      printf("hmoe.tim_attention (CUDA): positions[%lld, %lld] = %lld is outside [1, %lld]\n",
             (long long)b, (long long)i, (long long)p, (long long)s.P);
      CUDA_KERNEL_ASSERT(false && "hmoe.tim_attention: position out of range");
      p = -1;
    }
    row[i - c0] = r;
    pos[i - c0] = int32_t(p);
  }
}

// ---------------------------------------------------------------------------------------------
// Block phases shared by the forward and backward chunk kernels

// Phase A: E[r, :] = rows[row[r]] + PE[pos[r]] for the n steps of a tile, in opmath. The row
// loads (the DRAM gathers) of kUnroll vectors are issued before any is consumed; the PE rows
// (a small table, cache-resident) are read as they are added.
template <typename scalar_t, int kVec>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ rows,
                                          const scalar_t* __restrict__ pe, const int64_t* row,
                                          const int32_t* pos, int n, const TimShape& s,
                                          at::opmath_type<scalar_t>* E) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, kVec>;
  const int D = int(s.D), nv = D / kVec, total = n * nv;
  const int threads = int(blockDim.x);
  for (int q0 = int(threadIdx.x); q0 < total; q0 += threads * kUnroll) {
    vec_t x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all row loads first: kUnroll rows in flight
      const int q = q0 + u * threads;
      x[u] = zero_vec<scalar_t, kVec>();
      if (q < total) {
        const int r = q / nv, k = q - r * nv;
        const int64_t rr = row[r];
        if (rr >= 0) x[u] = load_vec<scalar_t, kVec>(rows + rr * s.row_stride + k * kVec);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int q = q0 + u * threads;
      if (q >= total) continue;
      const int r = q / nv, k = q - r * nv;
      const int32_t pp = pos[r];
      const vec_t p = pp >= 0 ? load_vec<scalar_t, kVec>(pe + int64_t(pp) * s.D + k * kVec)
                              : zero_vec<scalar_t, kVec>();
      acc_t* dst = E + r * D + k * kVec;
#pragma unroll
      for (int c = 0; c < kVec; ++c) dst[c] = acc_t(x[u].v[c]) + acc_t(p.v[c]);
    }
  }
}

// Phase B: for the n x H (step r, head h) pairs, dot = Σ_d X[r, h·Dh + d] · Y[h·Dh + d], each by
// `sub` lanes (strided over d, then a butterfly: fixed order), handed to f(r, h, dot) by the
// pair's first lane. Every lane of the block runs every loop trip (the shuffles need the warp).
template <typename acc_t, typename F>
__device__ __forceinline__ void head_dots(const acc_t* X, const acc_t* Y, int n,
                                          const TimShape& s, const F& f) {
  const int D = int(s.D), H = int(s.H), Dh = int(s.Dh), sub = s.sub;
  const int lane = int(threadIdx.x) % sub, per_pass = int(blockDim.x) / sub;
  const int pairs = n * H;
  for (int x0 = 0; x0 < pairs; x0 += per_pass) {
    const int x = x0 + int(threadIdx.x) / sub;
    const int r = x / H, h = x - r * H;
    acc_t dot = acc_t(0);
    if (x < pairs) {
      const acc_t* xr = X + r * D + h * Dh;
      const acc_t* yh = Y + h * Dh;
      for (int d = lane; d < Dh; d += sub) dot += xr[d] * yh[d];
    }
    for (int offset = sub / 2; offset > 0; offset /= 2) {
      dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    }
    if (x < pairs && lane == 0) f(r, h, dot);
  }
}

// The threads of the per-element phase: element vectors k0, k0 + et, ... of the D / kVec, rows
// split, split + rs, ... of the tile; threads with split >= rs sit it out.
struct ElementSplit {
  int k0, split;
  __device__ explicit ElementSplit(const TimShape& s)
      : k0(int(threadIdx.x) % s.et), split(int(threadIdx.x) / s.et) {}
};

// ---------------------------------------------------------------------------------------------
// Forward

// Block (b, c) = blockIdx.x / C, blockIdx.x % C: chunk c of sample b (the file comment).
// One chunk (C == 1): writes out, pooled and alpha. Several: writes the chunk's running max and
// sum of exp (B, C, H) and unnormalised m (B, C, D), and raw scores into alpha; chunks with no
// valid step write nothing (forward_combine_kernel only reads chunks below ceil(len / Cs)).
template <typename scalar_t, typename index_t, int kVec>
__global__ void __launch_bounds__(kBlockThreads, min_blocks<scalar_t>()) forward_chunk_kernel(
    const scalar_t* __restrict__ rows, const index_t* __restrict__ ids,
    const scalar_t* __restrict__ target, const scalar_t* __restrict__ pe,
    const index_t* __restrict__ positions, const int64_t* __restrict__ lengths,
    scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ alpha,
    at::opmath_type<scalar_t>* __restrict__ pooled,
    at::opmath_type<scalar_t>* __restrict__ part_max,
    at::opmath_type<scalar_t>* __restrict__ part_sum,
    at::opmath_type<scalar_t>* __restrict__ part_acc, const TimShape s, const SmemLayout lay,
    const at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* V = reinterpret_cast<acc_t*>(smem + lay.v);
  acc_t* M = reinterpret_cast<acc_t*>(smem + lay.x);
  acc_t* E = reinterpret_cast<acc_t*>(smem + lay.e);
  acc_t* S = reinterpret_cast<acc_t*>(smem + lay.s1);
  acc_t* head_max = reinterpret_cast<acc_t*>(smem + lay.heads);
  acc_t* head_sum = head_max + s.H;
  acc_t* head_scale = head_sum + s.H;
  acc_t* part = reinterpret_cast<acc_t*>(smem + lay.part);
  int64_t* row = reinterpret_cast<int64_t*>(smem + lay.row);
  int32_t* pos = reinterpret_cast<int32_t*>(smem + lay.pos);

  const int tid = int(threadIdx.x), threads = int(blockDim.x);
  const int D = int(s.D), H = int(s.H), Dh = int(s.Dh), R = s.tile;
  const int64_t b = int64_t(blockIdx.x) / s.num_chunks;
  const int64_t c = int64_t(blockIdx.x) - b * s.num_chunks;
  const int64_t len = checked_length(lengths, b, s.L, tid == 0);
  const int64_t c0 = c * s.chunk, c1 = std::min(s.L, c0 + s.chunk);
  const int64_t v1 = std::max(c0, std::min(len, c1));  // valid steps [c0, v1)
  if (s.num_chunks > 1 && v1 == c0) return;            // all padding (uniform in the block)

  stage_steps(ids, positions, b, c0, v1, s, row, pos);
  for (int e = tid; e < D; e += threads) {
    V[e] = acc_t(target[b * s.D + e]) + acc_t(pe[e]);
    M[e] = acc_t(0);
  }
  for (int h = tid; h < H; h += threads) {
    head_max[h] = -INFINITY;
    head_sum[h] = acc_t(0);
  }
  __syncthreads();

  const ElementSplit es(s);
  const int nv = D / kVec, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int warps = threads / kWarpSize;
  acc_t* alpha_b = alpha + b * s.H * s.L;
  for (int64_t t0 = c0; t0 < v1; t0 += R) {
    const int n = int(std::min<int64_t>(R, v1 - t0));
    load_tile<scalar_t, kVec>(rows, pe, row + (t0 - c0), pos + (t0 - c0), n, s, E);  // A
    __syncthreads();
    head_dots(E, V, n, s, [&](int r, int h, acc_t dot) {  // B
      const acc_t score = dot * scale;
      S[h * R + r] = score;
      alpha_b[int64_t(h) * s.L + t0 + r] = score;  // raw; normalised at the end
    });
    __syncthreads();
    for (int h = warp; h < H; h += warps) {  // C: online softmax, a warp per head
      acc_t* Sh = S + h * R;
      acc_t tile_max = -INFINITY;
      for (int r = lane; r < n; r += kWarpSize) tile_max = max_acc(tile_max, Sh[r]);
      tile_max = warp_max(tile_max);
      const acc_t old_max = head_max[h], new_max = max_acc(old_max, tile_max);
      acc_t sum = acc_t(0);
      for (int r = lane; r < n; r += kWarpSize) {
        const acc_t p = exp_acc(Sh[r] - new_max);
        Sh[r] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const acc_t rescale = exp_acc(old_max - new_max);  // 0 on the first tile
        head_scale[h] = rescale;
        head_sum[h] = head_sum[h] * rescale + sum;
        head_max[h] = new_max;
      }
    }
    __syncthreads();
    if (es.split < s.rs) {  // D: partial Σ p·ẽ over this thread's rows
      for (int k = es.k0; k < nv; k += s.et) {
        const int e0 = k * kVec;
        int hr[kVec];
        acc_t sum[kVec];
#pragma unroll
        for (int cc = 0; cc < kVec; ++cc) {
          hr[cc] = (e0 + cc) / Dh * R;
          sum[cc] = acc_t(0);
        }
        for (int r = es.split; r < n; r += s.rs) {
#pragma unroll
          for (int cc = 0; cc < kVec; ++cc) sum[cc] += S[hr[cc] + r] * E[r * D + e0 + cc];
        }
#pragma unroll
        for (int cc = 0; cc < kVec; ++cc) part[es.split * D + e0 + cc] = sum[cc];
      }
    }
    __syncthreads();
    for (int e = tid; e < D; e += threads) {  // the row splits, in order, into the running m
      acc_t value = M[e] * head_scale[e / Dh];
      for (int p = 0; p < s.rs; ++p) value += part[p * D + e];
      M[e] = value;
    }
    // No barrier needed here: the next tile's phases A-C touch neither M nor part, and each M[e]
    // is owned by one thread; the barriers after A and B order head_scale and part.
  }
  __syncthreads();

  if (s.num_chunks == 1) {
    for (int e = tid; e < D; e += threads) {
      const acc_t m = len > 0 ? M[e] / head_sum[e / Dh] : acc_t(0);
      pooled[b * s.D + e] = m;
      out[b * s.D + e] = scalar_t(len > 0 ? V[e] * m : acc_t(0));
    }
    for (int64_t x = tid; x < s.H * s.L; x += threads) {
      const int64_t h = x / s.L, i = x - h * s.L;
      alpha_b[x] = i < len ? exp_acc(alpha_b[x] - head_max[h]) / head_sum[h] : acc_t(0);
    }
  } else {
    const int64_t slot = b * s.num_chunks + c;
    for (int h = tid; h < H; h += threads) {
      part_max[slot * s.H + h] = head_max[h];
      part_sum[slot * s.H + h] = head_sum[h];
    }
    for (int e = tid; e < D; e += threads) part_acc[slot * s.D + e] = M[e];
  }
}

// Sample b = blockIdx.x of a chunked sequence: the chunks' partials combined in chunk order
// (log-sum-exp), then out, pooled and alpha. Shared memory: the combined max and sum (2, H).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads) forward_combine_kernel(
    const scalar_t* __restrict__ target, const scalar_t* __restrict__ pe,
    const int64_t* __restrict__ lengths, const at::opmath_type<scalar_t>* __restrict__ part_max,
    const at::opmath_type<scalar_t>* __restrict__ part_sum,
    const at::opmath_type<scalar_t>* __restrict__ part_acc, scalar_t* __restrict__ out,
    at::opmath_type<scalar_t>* __restrict__ alpha, at::opmath_type<scalar_t>* __restrict__ pooled,
    const TimShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* head_max = reinterpret_cast<acc_t*>(smem);
  acc_t* head_sum = head_max + s.H;
  const int tid = int(threadIdx.x), threads = int(blockDim.x);
  const int64_t b = blockIdx.x;
  const int64_t len = checked_length(lengths, b, s.L, tid == 0);
  const int64_t chunks = ceil_div(len, s.chunk);  // those with a valid step
  const int64_t first = b * s.num_chunks;
  for (int64_t h = tid; h < s.H; h += threads) {
    acc_t mx = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) mx = max_acc(mx, part_max[(first + c) * s.H + h]);
    acc_t sum = acc_t(0);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t at = (first + c) * s.H + h;
      sum += part_sum[at] * exp_acc(part_max[at] - mx);
    }
    head_max[h] = mx;
    head_sum[h] = sum;
  }
  __syncthreads();
  for (int64_t e = tid; e < s.D; e += threads) {
    const int64_t h = e / s.Dh;
    acc_t m = acc_t(0);
    for (int64_t c = 0; c < chunks; ++c) {
      m += part_acc[(first + c) * s.D + e] *
           exp_acc(part_max[(first + c) * s.H + h] - head_max[h]);
    }
    m = len > 0 ? m / head_sum[h] : acc_t(0);
    const acc_t v = acc_t(target[b * s.D + e]) + acc_t(pe[e]);
    pooled[b * s.D + e] = m;
    out[b * s.D + e] = scalar_t(len > 0 ? v * m : acc_t(0));
  }
  acc_t* alpha_b = alpha + b * s.H * s.L;
  for (int64_t x = tid; x < s.H * s.L; x += threads) {
    const int64_t h = x / s.L, i = x - h * s.L;
    alpha_b[x] = i < len ? exp_acc(alpha_b[x] - head_max[h]) / head_sum[h] : acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// Block (b, c) as in the forward. Writes grad_rows (B, L, D) for the chunk's steps (zeros at
// padding), their opmath copy grad_steps (B·L, D) when grad_rows is not already opmath
// (grad_steps != nullptr), and dṽ: into dv (B, D) and grad_target when C == 1, else the chunk's
// Σ ds'·ẽ into part_dv (B, C, D) (chunks with no valid step write no partial).
template <typename scalar_t, typename index_t, int kVec>
__global__ void __launch_bounds__(kBlockThreads, min_blocks<scalar_t>()) backward_chunk_kernel(
    const scalar_t* __restrict__ grad_out,
    const at::opmath_type<scalar_t>* __restrict__ grad_pooled,
    const scalar_t* __restrict__ rows, const index_t* __restrict__ ids,
    const scalar_t* __restrict__ target, const scalar_t* __restrict__ pe,
    const index_t* __restrict__ positions, const int64_t* __restrict__ lengths,
    const at::opmath_type<scalar_t>* __restrict__ alpha,
    const at::opmath_type<scalar_t>* __restrict__ pooled, scalar_t* __restrict__ grad_rows,
    at::opmath_type<scalar_t>* __restrict__ grad_steps, at::opmath_type<scalar_t>* __restrict__ dv,
    scalar_t* __restrict__ grad_target, at::opmath_type<scalar_t>* __restrict__ part_dv,
    const TimShape s, const SmemLayout lay, const at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, kVec>;
  using acc_vec_t = Vec<acc_t, kVec>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* V = reinterpret_cast<acc_t*>(smem + lay.v);
  acc_t* DM = reinterpret_cast<acc_t*>(smem + lay.x);
  acc_t* DV = reinterpret_cast<acc_t*>(smem + lay.y);
  acc_t* E = reinterpret_cast<acc_t*>(smem + lay.e);
  acc_t* A = reinterpret_cast<acc_t*>(smem + lay.s1);
  acc_t* DS = reinterpret_cast<acc_t*>(smem + lay.s2);
  acc_t* DMM = reinterpret_cast<acc_t*>(smem + lay.heads);
  acc_t* part = reinterpret_cast<acc_t*>(smem + lay.part);
  int64_t* row = reinterpret_cast<int64_t*>(smem + lay.row);
  int32_t* pos = reinterpret_cast<int32_t*>(smem + lay.pos);

  const int tid = int(threadIdx.x), threads = int(blockDim.x);
  const int D = int(s.D), Dh = int(s.Dh), R = s.tile;
  const int64_t b = int64_t(blockIdx.x) / s.num_chunks;
  const int64_t c = int64_t(blockIdx.x) - b * s.num_chunks;
  const int64_t len = checked_length(lengths, b, s.L, tid == 0);
  const int64_t c0 = c * s.chunk, c1 = std::min(s.L, c0 + s.chunk);
  const int64_t v1 = std::max(c0, std::min(len, c1));  // valid [c0, v1), padding [v1, c1)
  const int nv = D / kVec;

  // Padding: exact zeros (independent of everything below).
  for (int64_t q = tid; q < (c1 - v1) * nv; q += threads) {
    const int64_t r = q / nv, k = q - r * nv;
    store_vec<scalar_t, kVec>(grad_rows + (b * s.L + v1 + r) * s.D + k * kVec,
                              zero_vec<scalar_t, kVec>());
  }
  if (s.num_chunks > 1 && v1 == c0) return;  // no valid step (uniform in the block)

  stage_steps(ids, positions, b, c0, v1, s, row, pos);
  for (int e = tid; e < D; e += threads) {
    const acc_t v = acc_t(target[b * s.D + e]) + acc_t(pe[e]);
    V[e] = v;
    DM[e] = acc_t(grad_out[b * s.D + e]) * v + grad_pooled[b * s.D + e];
    DV[e] = acc_t(0);
    E[e] = pooled[b * s.D + e];  // row 0 of the tile holds m for ⟨dm^h, m^h⟩
  }
  __syncthreads();
  head_dots(E, DM, 1, s, [&](int, int h, acc_t dot) { DMM[h] = dot; });
  __syncthreads();

  const ElementSplit es(s);
  const acc_t* alpha_b = alpha + b * s.H * s.L;
  for (int64_t t0 = c0; t0 < v1; t0 += R) {
    const int n = int(std::min<int64_t>(R, v1 - t0));
    load_tile<scalar_t, kVec>(rows, pe, row + (t0 - c0), pos + (t0 - c0), n, s, E);  // A
    __syncthreads();
    head_dots(E, DM, n, s, [&](int r, int h, acc_t dot) {  // B: α and ds' per (step, head)
      const acc_t a = alpha_b[int64_t(h) * s.L + t0 + r];
      A[h * R + r] = a;
      DS[h * R + r] = scale * a * (dot - DMM[h]);
    });
    __syncthreads();
    if (es.split < s.rs) {  // D: dẽ per (step, element), partial Σ ds'·ẽ per row split
      for (int k = es.k0; k < nv; k += s.et) {
        const int e0 = k * kVec;
        int hr[kVec];
        acc_t sum[kVec];
#pragma unroll
        for (int cc = 0; cc < kVec; ++cc) {
          hr[cc] = (e0 + cc) / Dh * R;
          sum[cc] = acc_t(0);
        }
        for (int r = es.split; r < n; r += s.rs) {
          vec_t g;
          acc_vec_t g_acc;
#pragma unroll
          for (int cc = 0; cc < kVec; ++cc) {
            const acc_t ds = DS[hr[cc] + r];
            const acc_t de = A[hr[cc] + r] * DM[e0 + cc] + ds * V[e0 + cc];
            sum[cc] += ds * E[r * D + e0 + cc];
            g.v[cc] = scalar_t(de);
            g_acc.v[cc] = de;
          }
          const int64_t at = (b * s.L + t0 + r) * s.D + e0;
          store_vec<scalar_t, kVec>(grad_rows + at, g);
          if (grad_steps != nullptr) store_vec<acc_t, kVec>(grad_steps + at, g_acc);
        }
#pragma unroll
        for (int cc = 0; cc < kVec; ++cc) part[es.split * D + e0 + cc] = sum[cc];
      }
    }
    __syncthreads();
    for (int e = tid; e < D; e += threads) {  // the row splits, in order
      acc_t value = DV[e];
      for (int p = 0; p < s.rs; ++p) value += part[p * D + e];
      DV[e] = value;
    }
    // As in the forward: DV[e] is owned by one thread, part is next written after two barriers.
  }
  __syncthreads();

  if (s.num_chunks == 1) {
    for (int e = tid; e < D; e += threads) {
      const acc_t value = acc_t(grad_out[b * s.D + e]) * pooled[b * s.D + e] + DV[e];
      dv[b * s.D + e] = value;
      grad_target[b * s.D + e] = scalar_t(value);
    }
  } else {
    for (int e = tid; e < D; e += threads) {
      part_dv[(b * s.num_chunks + c) * s.D + e] = DV[e];
    }
  }
}

// Sample b = blockIdx.x of a chunked sequence: dṽ = g ⊙ m + Σ over chunks, in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads) backward_combine_kernel(
    const scalar_t* __restrict__ grad_out, const at::opmath_type<scalar_t>* __restrict__ pooled,
    const int64_t* __restrict__ lengths, const at::opmath_type<scalar_t>* __restrict__ part_dv,
    at::opmath_type<scalar_t>* __restrict__ dv, scalar_t* __restrict__ grad_target,
    const TimShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  const int64_t len = checked_length(lengths, b, s.L, threadIdx.x == 0);
  const int64_t chunks = ceil_div(len, s.chunk);
  for (int64_t e = threadIdx.x; e < s.D; e += blockDim.x) {
    acc_t sum = acc_t(0);
    for (int64_t c = 0; c < chunks; ++c) sum += part_dv[(b * s.num_chunks + c) * s.D + e];
    const acc_t value = acc_t(grad_out[b * s.D + e]) * pooled[b * s.D + e] + sum;
    dv[b * s.D + e] = value;
    grad_target[b * s.D + e] = scalar_t(value);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: the position table's gradient (the file comment)

// A (sub-)warp of `size` lanes (a power of two <= 32) that works on one piece or run at a time.
// The position kernels use no shuffles, so groups only split a row's columns.
struct Group {
  int size, lane, per_block;
  int64_t index;
  __device__ explicit Group(int lanes) : size(lanes) {
    lane = int(threadIdx.x) % lanes;
    per_block = int(blockDim.x) / lanes;
    index = int64_t(blockIdx.x) * per_block + int(threadIdx.x) / lanes;
  }
  __device__ int64_t stride() const { return int64_t(gridDim.x) * per_block; }
};

// Item j < B·L is step j (key: its position at a valid step, P + 1 at padding or after a bad
// position); item B·L + b is the target of sample b (key 0).
template <typename index_t>
__global__ void __launch_bounds__(kGroupThreads) position_keys_kernel(
    const index_t* __restrict__ positions, const int64_t* __restrict__ lengths, const TimShape s,
    int64_t num_items, uint32_t* __restrict__ keys, int32_t* __restrict__ items) {
  const int64_t steps = s.B * s.L;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < num_items;
       j += int64_t(gridDim.x) * blockDim.x) {
    uint32_t key = 0;
    if (j < steps) {
      const int64_t b = j / s.L, i = j - b * s.L;
      const int64_t len = lengths[b];  // reported by the chunk kernel if bad
      key = uint32_t(s.P + 1);
      if (i < len) {
        const int64_t p = int64_t(positions[j]);
        if (p >= 1 && p <= s.P) key = uint32_t(p);
      }
    }
    keys[j] = key;
    items[j] = int32_t(j);
  }
}

// starts[k], ends[k]: the run of key k in the sorted keys (both 0 when k has no item).
__global__ void __launch_bounds__(kGroupThreads) position_bounds_kernel(
    const uint32_t* __restrict__ keys, int64_t n, int32_t* __restrict__ starts,
    int32_t* __restrict__ ends) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t key = keys[j];
    if (j == 0 || keys[j - 1] != key) starts[key] = int32_t(j);
    if (j == n - 1 || keys[j + 1] != key) ends[key] = int32_t(j + 1);
  }
}

// Piece q = sorted items [q·kPiece, + kPiece), one group each, summed in order. A run that
// begins and ends in the piece is written to grad_pe; the piece's first run, when it began in an
// earlier piece, goes to head[q]; its last run, when it continues into the next piece (and did
// not begin earlier), to tail[q]. Runs of key P + 1 (padding) are dropped.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kGroupThreads) position_pieces_kernel(
    const uint32_t* __restrict__ keys, const int32_t* __restrict__ items, int64_t n,
    const at::opmath_type<scalar_t>* __restrict__ steps,
    const at::opmath_type<scalar_t>* __restrict__ dv, int64_t num_steps, int64_t D, int64_t P,
    scalar_t* __restrict__ grad_pe, at::opmath_type<scalar_t>* __restrict__ head,
    at::opmath_type<scalar_t>* __restrict__ tail, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  using acc_vec_t = Vec<acc_t, kVec>;
  const Group group(group_size);
  const int64_t num_pieces = ceil_div(n, kPiece), pass = int64_t(group.size) * kVec;
  for (int64_t q = group.index; q < num_pieces; q += group.stride()) {
    const int64_t j0 = q * kPiece, j1 = std::min(n, j0 + kPiece);
    for (int64_t col = 0; col < D; col += pass) {
      const int64_t e = col + int64_t(group.lane) * kVec;
      const bool active = e < D;
      acc_t acc[kVec];
#pragma unroll
      for (int cc = 0; cc < kVec; ++cc) acc[cc] = acc_t(0);
      uint32_t key = keys[j0];
      int64_t begin = j0;  // where the current run starts (within the piece)
      auto flush = [&](int64_t end) {
        acc_t* dst = nullptr;
        if (begin == j0 && j0 > 0 && keys[j0 - 1] == key) {
          dst = head + q * D;
        } else if (end == j1 && j1 < n && keys[j1] == key) {
          dst = tail + q * D;
        }
        if (!active) return;
        if (dst != nullptr) {
          acc_vec_t value;
#pragma unroll
          for (int cc = 0; cc < kVec; ++cc) value.v[cc] = acc[cc];
          store_vec<acc_t, kVec>(dst + e, value);
        } else if (int64_t(key) <= P) {
          Vec<scalar_t, kVec> value;
#pragma unroll
          for (int cc = 0; cc < kVec; ++cc) value.v[cc] = scalar_t(acc[cc]);
          store_vec<scalar_t, kVec>(grad_pe + int64_t(key) * D + e, value);
        }
      };
      for (int64_t j = j0; j < j1; j += kUnroll) {
        acc_vec_t x[kUnroll];
        uint32_t k[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {  // all loads first
          k[u] = 0;
          x[u] = zero_vec<acc_t, kVec>();
          if (j + u < j1) {
            k[u] = keys[j + u];
            const int64_t item = items[j + u];
            const acc_t* src = item < num_steps ? steps + item * D : dv + (item - num_steps) * D;
            if (active) x[u] = load_vec<acc_t, kVec>(src + e);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (j + u >= j1) continue;
          if (k[u] != key) {
            flush(j + u);
#pragma unroll
            for (int cc = 0; cc < kVec; ++cc) acc[cc] = acc_t(0);
            key = k[u];
            begin = j + u;
          }
#pragma unroll
          for (int cc = 0; cc < kVec; ++cc) acc[cc] += x[u].v[cc];
        }
      }
      flush(j1);
    }
  }
}

// Position p = group index: a run spanning pieces first..last (first < last) is its first
// piece's tail plus the heads of the following pieces, in order. Single-piece runs were written
// by position_pieces_kernel, positions without items keep their zeros.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kGroupThreads) position_runs_kernel(
    const int32_t* __restrict__ starts, const int32_t* __restrict__ ends, int64_t D, int64_t P,
    const at::opmath_type<scalar_t>* __restrict__ head,
    const at::opmath_type<scalar_t>* __restrict__ tail, scalar_t* __restrict__ grad_pe,
    int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  using acc_vec_t = Vec<acc_t, kVec>;
  const Group group(group_size);
  const int64_t pass = int64_t(group.size) * kVec;
  for (int64_t p = group.index; p <= P; p += group.stride()) {
    const int64_t begin = starts[p], end = ends[p];
    if (end <= begin) continue;
    const int64_t first = begin / kPiece, last = (end - 1) / kPiece;
    if (first == last) continue;
    for (int64_t e = int64_t(group.lane) * kVec; e < D; e += pass) {
      acc_vec_t sum = load_vec<acc_t, kVec>(tail + first * D + e);
      for (int64_t q = first + 1; q <= last; ++q) {
        const acc_vec_t x = load_vec<acc_t, kVec>(head + q * D + e);
#pragma unroll
        for (int cc = 0; cc < kVec; ++cc) sum.v[cc] += x.v[cc];
      }
      Vec<scalar_t, kVec> value;
#pragma unroll
      for (int cc = 0; cc < kVec; ++cc) value.v[cc] = scalar_t(sum.v[cc]);
      store_vec<scalar_t, kVec>(grad_pe + p * D + e, value);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch geometry (host; a function of the shapes and dtypes only)

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

int64_t align16(int64_t bytes) { return ceil_div(bytes, 16) * 16; }

// Chunks, tile, lanes per dot product and the per-element split, for vectors of kvec elements.
// per_step: opmath values a tile keeps per step (D of ẽ plus one or two per head).
TimShape make_shape(int64_t B, int64_t L, int64_t D, int64_t H, int64_t N, int64_t P,
                    int64_t row_stride, int64_t acc_bytes, int64_t kvec, bool backward) {
  TimShape s{};
  s.B = B, s.L = L, s.D = D, s.H = H, s.Dh = D / H, s.N = N, s.P = P;
  s.row_stride = row_stride;
  s.chunk = L <= kChunk ? std::max<int64_t>(L, 1) : kChunk;
  s.num_chunks = L <= kChunk ? 1 : ceil_div(L, kChunk);
  const int64_t per_step = D + (backward ? 2 : 1) * H;
  int64_t tile = kMaxTile;
  while (tile > 1 && tile * per_step * acc_bytes > kTileBytes) tile /= 2;
  s.tile = int(tile);
  s.sub = int(std::min<int64_t>(kWarpSize, next_pow2(ceil_div(s.Dh, 4))));
  const int64_t nv = D / kvec;
  s.et = int(std::min<int64_t>(nv, kBlockThreads));
  s.rs = kBlockThreads / s.et;
  return s;
}

SmemLayout make_layout(const TimShape& s, int64_t acc_bytes, bool backward) {
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t offset = at;
    at += align16(bytes);
    return offset;
  };
  const int64_t D = s.D * acc_bytes, heads_tile = s.H * s.tile * acc_bytes;
  int64_t v = take(D), x = take(D), y = backward ? take(D) : 0;
  int64_t e = take(s.tile * D), s1 = take(heads_tile), s2 = backward ? take(heads_tile) : 0;
  int64_t heads = take((backward ? 1 : 3) * s.H * acc_bytes);
  int64_t part = take(s.rs * D);
  int64_t row = take(s.chunk * 8), pos = take(s.chunk * 4);
  TORCH_CHECK(at <= INT_MAX, "hmoe.tim_attention (CUDA): D = ", s.D, " and num_heads = ", s.H,
              " need too much shared memory");
  SmemLayout lay{};
  lay.v = int(v), lay.x = int(x), lay.y = int(y), lay.e = int(e), lay.s1 = int(s1),
  lay.s2 = int(s2), lay.heads = int(heads), lay.part = int(part), lay.row = int(row),
  lay.pos = int(pos), lay.bytes = int(at);
  return lay;
}

// Lanes per group for rows of `units` vectors: the smallest power of two covering it, <= 32.
int group_size_for(int64_t units) {
  int lanes = 1;
  while (lanes < kWarpSize && lanes < units) lanes <<= 1;
  return lanes;
}

// ==== device code: end ========================================================================

bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % uintptr_t(bytes) == 0;
}

// Blocks for `work` items at `per_block` each, capped at a few waves (kernels loop grid-stride).
dim3 grid_for(int64_t work, int64_t per_block, int threads) {
  const int64_t needed = ceil_div(work, per_block);
  const int64_t resident = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                           (2048 / threads);
  return dim3(unsigned(std::max<int64_t>(1, std::min(needed, 4 * resident))));
}

// Lets `kernel` use `bytes` of dynamic shared memory (beyond the default 48 KiB when needed).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, int64_t bytes, const TimShape& s) {
  const int64_t limit = int64_t(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  TORCH_CHECK(bytes <= limit, "hmoe.tim_attention (CUDA): D = ", s.D, " with num_heads = ", s.H,
              " needs ", bytes, " bytes of shared memory per block, more than the device's ",
              limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(bytes)));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: checks and the two ops

// The validated inputs of either op (contiguous where the kernels need it).
struct Inputs {
  at::Tensor rows, target, pe, positions, lengths;
  std::optional<at::Tensor> ids;
  int64_t B, L, D, H, N, P, row_stride;
};

Inputs check_inputs(const at::Tensor& rows_in, const std::optional<at::Tensor>& ids_in,
                    const at::Tensor& target_in, const at::Tensor& pe_in,
                    const at::Tensor& positions_in, const at::Tensor& lengths_in,
                    int64_t num_heads) {
  const at::Tensor& rows = rows_in;
  const at::Tensor& target = target_in;
  const at::Tensor& position_embedding = pe_in;
  const at::Tensor& positions = positions_in;
  const at::Tensor& lengths = lengths_in;
  TORCH_CHECK(rows.is_cuda(), "rows must be a CUDA tensor, got ", rows.device());
  const auto dev = rows.device();
  HMOE_CHECK_DIM(rows, 2);
  HMOE_CHECK_DIM(target, 2);
  HMOE_CHECK_DIM(position_embedding, 2);
  HMOE_CHECK_DIM(positions, 2);
  HMOE_CHECK_DIM(lengths, 1);
  const auto dtype = rows.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "rows must be float32, float64, bfloat16 or float16, got ", dtype);
  HMOE_CHECK_DTYPE(target, dtype);
  HMOE_CHECK_DTYPE(position_embedding, dtype);
  HMOE_CHECK_INDEX_DTYPE(positions);
  HMOE_CHECK_DTYPE(lengths, at::kLong);
  HMOE_CHECK_DEVICE(target, dev);
  HMOE_CHECK_DEVICE(position_embedding, dev);
  HMOE_CHECK_DEVICE(positions, dev);
  HMOE_CHECK_DEVICE(lengths, dev);
  const int64_t B = target.size(0), D = target.size(1), L = positions.size(1);
  TORCH_CHECK_VALUE(D >= 1, "target must be (B, D) with D >= 1, got shape ", target.sizes());
  TORCH_CHECK_VALUE(rows.size(1) == D, "rows must be (N, D=", D, "), got shape ", rows.sizes());
  TORCH_CHECK_VALUE(position_embedding.size(1) == D && position_embedding.size(0) >= 2,
                    "position_embedding must be (P + 1, D=", D, ") with P >= 1, got shape ",
                    position_embedding.sizes());
  TORCH_CHECK_VALUE(positions.size(0) == B, "positions must be (B=", B, ", L), got shape ",
                    positions.sizes());
  TORCH_CHECK_VALUE(lengths.size(0) == B, "lengths must be (B=", B, ",), got shape ",
                    lengths.sizes());
  TORCH_CHECK_VALUE(num_heads >= 1 && D % num_heads == 0,
                    "num_heads must be a positive divisor of D=", D, ", got ", num_heads);
  if (ids_in.has_value()) {
    const at::Tensor& ids = *ids_in;
    HMOE_CHECK_DIM(ids, 2);
    HMOE_CHECK_DEVICE(ids, dev);
    TORCH_CHECK(ids.scalar_type() == positions.scalar_type(), "ids must have the dtype of "
                "positions (", positions.scalar_type(), "), got ", ids.scalar_type());
    TORCH_CHECK_VALUE(ids.size(0) == B && ids.size(1) == L, "ids must be (B=", B, ", L=", L,
                      "), got shape ", ids.sizes());
  } else {
    TORCH_CHECK_VALUE(rows.size(0) == B * L, "without ids, rows must be the pre-gathered (B·L=",
                      B * L, ", D=", D, ") behaviours, got shape ", rows.sizes());
  }
  const int64_t steps = B * L;
  TORCH_CHECK(steps + B <= INT_MAX,
              "the CUDA kernels of hmoe.tim_attention take at most 2^31 - 1 steps per call, got "
              "B = ", B, ", L = ", L);
  TORCH_CHECK(position_embedding.size(0) <= INT_MAX, "position_embedding has too many rows: ",
              position_embedding.sizes());

  Inputs in;
  // Rows keep their row stride (a column slice of a wider table is read in place) as long as
  // the columns are contiguous.
  const bool rows_ok = rows.stride(1) == 1 && (rows.size(0) <= 1 || rows.stride(0) >= D);
  in.rows = rows_ok ? rows : rows.contiguous();
  in.row_stride = in.rows.size(0) <= 1 ? D : in.rows.stride(0);
  in.target = target.contiguous();
  in.pe = position_embedding.contiguous();
  in.positions = positions.contiguous();
  in.lengths = lengths.contiguous();
  if (ids_in.has_value()) in.ids = ids_in->contiguous();
  in.B = B, in.L = L, in.D = D, in.H = num_heads, in.N = rows.size(0);
  in.P = position_embedding.size(0) - 1;
  return in;
}

at::ScalarType stats_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether vectors of `width` elements are safe: D, the row stride and every pointer allow it.
bool vectors_allowed(const Inputs& in, int64_t width, int64_t element_bytes,
                     std::initializer_list<const void*> pointers) {
  if (width <= 1 || in.D % width != 0 || in.row_stride % width != 0) return false;
  for (const void* ptr : pointers) {
    if (!is_aligned(ptr, width * element_bytes)) return false;
  }
  return true;
}

template <typename scalar_t, typename index_t>
void launch_forward(const Inputs& in, const at::Tensor& out, const at::Tensor& alpha,
                    const at::Tensor& pooled, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWide = 16 / int(sizeof(scalar_t));
  const bool wide = vectors_allowed(in, kWide, sizeof(scalar_t),
                                    {in.rows.data_ptr(), in.pe.data_ptr()});
  const TimShape s = make_shape(in.B, in.L, in.D, in.H, in.N, in.P, in.row_stride,
                                sizeof(acc_t), wide ? kWide : 1, /*backward=*/false);
  const SmemLayout lay = make_layout(s, sizeof(acc_t), /*backward=*/false);
  const acc_t scale = acc_t(1.0 / std::sqrt(double(s.Dh)));
  const auto stats = alpha.options();
  at::Tensor part_max, part_sum, part_acc;
  if (s.num_chunks > 1) {
    part_max = at::empty({in.B, s.num_chunks, in.H}, stats);
    part_sum = at::empty({in.B, s.num_chunks, in.H}, stats);
    part_acc = at::empty({in.B, s.num_chunks, in.D}, stats);
  }
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
  const index_t* ids = in.ids ? in.ids->data_ptr<index_t>() : nullptr;
  auto launch = [&](auto vec_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    auto kernel = forward_chunk_kernel<scalar_t, index_t, kVec>;
    allow_shared_memory(kernel, lay.bytes, s);
    kernel<<<unsigned(in.B * s.num_chunks), kBlockThreads, lay.bytes, stream>>>(
        in.rows.data_ptr<scalar_t>(), ids, in.target.data_ptr<scalar_t>(),
        in.pe.data_ptr<scalar_t>(), in.positions.data_ptr<index_t>(),
        in.lengths.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), alpha.data_ptr<acc_t>(),
        pooled.data_ptr<acc_t>(), ptr(part_max), ptr(part_sum), ptr(part_acc), s, lay, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (wide) {
    launch(std::integral_constant<int, kWide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  if (s.num_chunks > 1) {
    const int64_t bytes = 2 * in.H * int64_t(sizeof(acc_t));
    auto kernel = forward_combine_kernel<scalar_t>;
    allow_shared_memory(kernel, bytes, s);
    kernel<<<unsigned(in.B), kBlockThreads, bytes, stream>>>(
        in.target.data_ptr<scalar_t>(), in.pe.data_ptr<scalar_t>(),
        in.lengths.data_ptr<int64_t>(), part_max.data_ptr<acc_t>(), part_sum.data_ptr<acc_t>(),
        part_acc.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), alpha.data_ptr<acc_t>(),
        pooled.data_ptr<acc_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tim_attention_cuda(
    const at::Tensor& rows, const std::optional<at::Tensor>& ids, const at::Tensor& target,
    const at::Tensor& position_embedding, const at::Tensor& positions, const at::Tensor& lengths,
    int64_t num_heads) {
  const Inputs in =
      check_inputs(rows, ids, target, position_embedding, positions, lengths, num_heads);
  const c10::cuda::CUDAGuard device_guard(rows.device());
  const auto stats = in.target.options().dtype(stats_type(in.target.scalar_type()));
  auto out = at::empty({in.B, in.D}, in.target.options());
  auto alpha = at::empty({in.B, in.H, in.L}, stats);
  auto pooled = at::empty({in.B, in.D}, stats);
  if (in.B == 0) return {out, alpha, pooled};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.rows.scalar_type(), "tim_attention_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(in.positions.scalar_type(), "tim_attention_cuda", [&] {
          launch_forward<scalar_t, index_t>(in, out, alpha, pooled, stream);
        });
      });
  return {out, alpha, pooled};
}

template <typename scalar_t, typename index_t>
void launch_backward(const Inputs& in, const at::Tensor& grad_out, const at::Tensor& grad_pooled,
                     const at::Tensor& alpha, const at::Tensor& pooled,
                     const at::Tensor& grad_rows, const at::Tensor& grad_target,
                     const at::Tensor& grad_pe, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  constexpr int kWide = 16 / int(sizeof(scalar_t));
  const auto acc_options = grad_pooled.options();
  const int64_t steps = in.B * in.L;
  // The per-step gradient in opmath for the position table: grad_rows itself when it is opmath.
  at::Tensor grad_steps = kSameType ? grad_rows : at::empty({steps, in.D}, acc_options);
  const bool wide = vectors_allowed(in, kWide, sizeof(scalar_t),
                                    {in.rows.data_ptr(), in.pe.data_ptr(), grad_rows.data_ptr()}) &&
                    is_aligned(grad_steps.data_ptr(), kWide * int64_t(sizeof(acc_t)));
  const TimShape s = make_shape(in.B, in.L, in.D, in.H, in.N, in.P, in.row_stride,
                                sizeof(acc_t), wide ? kWide : 1, /*backward=*/true);
  const SmemLayout lay = make_layout(s, sizeof(acc_t), /*backward=*/true);
  const acc_t scale = acc_t(1.0 / std::sqrt(double(s.Dh)));
  auto dv = at::empty({in.B, in.D}, acc_options);
  at::Tensor part_dv;
  if (s.num_chunks > 1) part_dv = at::empty({in.B, s.num_chunks, in.D}, acc_options);
  const index_t* ids = in.ids ? in.ids->data_ptr<index_t>() : nullptr;

  auto launch = [&](auto vec_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    auto kernel = backward_chunk_kernel<scalar_t, index_t, kVec>;
    allow_shared_memory(kernel, lay.bytes, s);
    kernel<<<unsigned(in.B * s.num_chunks), kBlockThreads, lay.bytes, stream>>>(
        grad_out.data_ptr<scalar_t>(), grad_pooled.data_ptr<acc_t>(),
        in.rows.data_ptr<scalar_t>(), ids, in.target.data_ptr<scalar_t>(),
        in.pe.data_ptr<scalar_t>(), in.positions.data_ptr<index_t>(),
        in.lengths.data_ptr<int64_t>(), alpha.data_ptr<acc_t>(), pooled.data_ptr<acc_t>(),
        grad_rows.data_ptr<scalar_t>(), kSameType ? nullptr : grad_steps.data_ptr<acc_t>(),
        dv.data_ptr<acc_t>(), grad_target.data_ptr<scalar_t>(),
        part_dv.defined() ? part_dv.data_ptr<acc_t>() : nullptr, s, lay, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (wide) {
    launch(std::integral_constant<int, kWide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  if (s.num_chunks > 1) {
    backward_combine_kernel<scalar_t><<<unsigned(in.B), kBlockThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), pooled.data_ptr<acc_t>(), in.lengths.data_ptr<int64_t>(),
        part_dv.data_ptr<acc_t>(), dv.data_ptr<acc_t>(), grad_target.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Position table: items sorted by key (stable), runs located, pieces summed, runs completed.
  const int64_t num_items = steps + in.B;
  const auto index_options = in.lengths.options();
  auto keys = at::empty({num_items}, index_options.dtype(at::kInt));
  auto items = at::empty({num_items}, index_options.dtype(at::kInt));
  auto sorted_keys = at::empty({num_items}, index_options.dtype(at::kInt));
  auto sorted_items = at::empty({num_items}, index_options.dtype(at::kInt));
  auto* keys_ptr = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
  auto* sorted_keys_ptr = reinterpret_cast<uint32_t*>(sorted_keys.data_ptr<int32_t>());
  position_keys_kernel<index_t>
      <<<grid_for(num_items, kGroupThreads, kGroupThreads), kGroupThreads, 0, stream>>>(
          in.positions.data_ptr<index_t>(), in.lengths.data_ptr<int64_t>(), s, num_items,
          keys_ptr, items.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Keys lie in [0, P + 1]: only that many bits need sorting.
  const int end_bit = std::max(1, bits_for(in.P + 2));
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, keys_ptr, sorted_keys_ptr, items.data_ptr<int32_t>(),
      sorted_items.data_ptr<int32_t>(), num_items, 0, end_bit, stream));
  auto temp = at::empty({int64_t(std::max<size_t>(temp_bytes, 1))},
                        index_options.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.data_ptr(), temp_bytes, keys_ptr, sorted_keys_ptr, items.data_ptr<int32_t>(),
      sorted_items.data_ptr<int32_t>(), num_items, 0, end_bit, stream));

  auto starts = at::zeros({in.P + 2}, index_options.dtype(at::kInt));
  auto ends = at::zeros({in.P + 2}, index_options.dtype(at::kInt));
  position_bounds_kernel<<<grid_for(num_items, kGroupThreads, kGroupThreads), kGroupThreads, 0,
                           stream>>>(sorted_keys_ptr, num_items, starts.data_ptr<int32_t>(),
                                     ends.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t num_pieces = ceil_div(num_items, kPiece);
  auto head = at::empty({num_pieces, in.D}, acc_options);
  auto tail = at::empty({num_pieces, in.D}, acc_options);
  constexpr int kAccWide = 16 / int(sizeof(acc_t));
  const bool acc_wide = in.D % kAccWide == 0 && is_aligned(grad_steps.data_ptr(), 16) &&
                        is_aligned(dv.data_ptr(), 16) && is_aligned(head.data_ptr(), 16) &&
                        is_aligned(tail.data_ptr(), 16) &&
                        is_aligned(grad_pe.data_ptr(), kAccWide * sizeof(scalar_t));
  auto launch_positions = [&](auto vec_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    const int group_size = group_size_for(ceil_div(in.D, kVec));
    const int64_t per_block = kGroupThreads / group_size;
    position_pieces_kernel<scalar_t, kVec>
        <<<grid_for(num_pieces, per_block, kGroupThreads), kGroupThreads, 0, stream>>>(
            sorted_keys_ptr, sorted_items.data_ptr<int32_t>(), num_items,
            grad_steps.data_ptr<acc_t>(), dv.data_ptr<acc_t>(), steps, in.D, in.P,
            grad_pe.data_ptr<scalar_t>(), head.data_ptr<acc_t>(), tail.data_ptr<acc_t>(),
            group_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    position_runs_kernel<scalar_t, kVec>
        <<<grid_for(in.P + 1, per_block, kGroupThreads), kGroupThreads, 0, stream>>>(
            starts.data_ptr<int32_t>(), ends.data_ptr<int32_t>(), in.D, in.P,
            head.data_ptr<acc_t>(), tail.data_ptr<acc_t>(), grad_pe.data_ptr<scalar_t>(),
            group_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (acc_wide) {
    launch_positions(std::integral_constant<int, kAccWide>{});
  } else {
    launch_positions(std::integral_constant<int, 1>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tim_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& grad_pooled_in, const at::Tensor& rows,
    const std::optional<at::Tensor>& ids, const at::Tensor& target,
    const at::Tensor& position_embedding, const at::Tensor& positions, const at::Tensor& lengths,
    const at::Tensor& alpha_in, const at::Tensor& pooled_in, int64_t num_heads) {
  const Inputs in =
      check_inputs(rows, ids, target, position_embedding, positions, lengths, num_heads);
  const auto dev = rows.device();
  const auto dtype = in.target.scalar_type(), stats = stats_type(dtype);
  const at::Tensor& grad_out = grad_out_in;
  const at::Tensor& grad_pooled = grad_pooled_in;
  const at::Tensor& alpha = alpha_in;
  const at::Tensor& pooled = pooled_in;
  auto check_bd = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == in.B && t.size(1) == in.D, name,
                      " must be (B=", in.B, ", D=", in.D, "), got shape ", t.sizes());
  };
  check_bd(grad_out, "grad_out");
  check_bd(grad_pooled, "grad_pooled");
  check_bd(pooled, "pooled");
  TORCH_CHECK_VALUE(alpha.dim() == 3 && alpha.size(0) == in.B && alpha.size(1) == in.H &&
                        alpha.size(2) == in.L,
                    "alpha must be (B=", in.B, ", H=", in.H, ", L=", in.L, "), got shape ",
                    alpha.sizes());
  HMOE_CHECK_DTYPE(grad_out, dtype);
  HMOE_CHECK_DTYPE(grad_pooled, stats);
  HMOE_CHECK_DTYPE(alpha, stats);
  HMOE_CHECK_DTYPE(pooled, stats);
  HMOE_CHECK_DEVICE(grad_out, dev);
  HMOE_CHECK_DEVICE(grad_pooled, dev);
  HMOE_CHECK_DEVICE(alpha, dev);
  HMOE_CHECK_DEVICE(pooled, dev);
  const c10::cuda::CUDAGuard device_guard(dev);
  const at::Tensor g = grad_out.contiguous(), gm = grad_pooled.contiguous();
  const at::Tensor a = alpha.contiguous(), m = pooled.contiguous();
  auto grad_rows = at::empty({in.B, in.L, in.D}, in.target.options());
  auto grad_target = at::empty({in.B, in.D}, in.target.options());
  auto grad_pe = at::zeros({in.P + 1, in.D}, in.target.options());
  if (in.B == 0) return {grad_rows, grad_target, grad_pe};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.rows.scalar_type(), "tim_attention_backward_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(in.positions.scalar_type(), "tim_attention_backward_cuda", [&] {
          launch_backward<scalar_t, index_t>(in, g, gm, a, m, grad_rows, grad_target, grad_pe,
                                             stream);
        });
      });
  return {grad_rows, grad_target, grad_pe};
}

}  // namespace
}  // namespace hmoe

TORCH_LIBRARY_IMPL(hmoe, CUDA, m) {
  m.impl("tim_attention", &hmoe::tim_attention_cuda);
  m.impl("tim_attention_backward", &hmoe::tim_attention_backward_cuda);
}
