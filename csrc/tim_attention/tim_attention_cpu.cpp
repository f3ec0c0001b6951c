// CPU kernels of TIM target attention (math and shapes: hmoe/ops/tim_attention.py).
//
// Forward: samples in parallel, one pass over a sample's valid steps. Each step's row (by id
// from the item table, prefetched a few steps ahead, or the pre-gathered row) and its position
// row are added once into a
// D-wide register-sized buffer ẽ_i; per head the score s = <ẽ_i, ṽ> / sqrt(D / H) updates an
// online softmax (running max, running sum of exp, running m = Σ exp(s - max) ẽ_i, rescaled when
// the max grows), so every row is read exactly once and nothing (B, L, D) is written. The raw
// scores go to alpha and are normalised in place at the end of the sample; out = ṽ ⊙ m.
//
// Backward: one pass over the steps per sample. dm = g ⊙ ṽ + g_m and <dm, m> per head are
// formed once; per step ẽ_i is rebuilt from its two rows, ds = α (<dm, ẽ_i> - <dm, m>) per head,
// dẽ_i = α dm + c·ds·ṽ is written to grad_rows and added to the step's position row, and
// dṽ += c·ds·ẽ_i. The position gradient is privatised: the batch is cut into chunks whose size
// depends only on B, P and D (never on the thread count), each chunk sums into its own (P + 1, D)
// table in sample order, and the tables are added in chunk order, so the result is bitwise the
// same for any number of threads.
//
// Steps i >= lengths[b] are never read (rows, ids and positions alike); grad_rows is zero there.
//
// Fused backward (ids given): the optimizer step on the item table is applied inside backward,
// so no (B, L, D) row gradient, sparse gradient or separate optimizer pass exists. The valid steps
// are radix-sorted by row; the sorted list is cut into chunks at row boundaries (the cut depends
// only on the data, never on the thread count) and each chunk walks its rows in increasing
// order, reading each row once (near-sequentially: the rows are sorted), forming the gradient of
// every step that reads it from the per-sample dm, ṽ and <dm, m> computed up front, summing them
// and updating the row once. dṽ and the position gradient are privatised per chunk and added in
// chunk order, so the result is bitwise the same for any number of threads.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "hmoe/checks.h"
#include "hmoe/fused_optimizer.h"
#include "hmoe/radix_sort.h"

namespace hmoe {
namespace {

// Shapes and strides of one call, validated once.
struct Shapes {
  int64_t B, L, D, H, Dh, P1;  // P1 = P + 1 position rows
  int64_t N, row_stride;       // rows: N rows, row_stride elements apart
  bool gather;                 // ids given
};

// The row of step i of sample b.
template <typename scalar_t, typename index_t>
inline const scalar_t* step_row(const scalar_t* rows, const index_t* ids, const Shapes& s,
                                int64_t b, int64_t i) {
  const int64_t r = s.gather ? int64_t(ids[b * s.L + i]) : b * s.L + i;
  return rows + r * s.row_stride;
}

// Gathered rows are random reads from a table far larger than the caches: ask for the row of a
// step kPrefetch steps ahead while this one is summed, so several misses are in flight.
constexpr int64_t kPrefetch = 8;

template <typename scalar_t, typename index_t>
inline void prefetch_step(const scalar_t* rows, const index_t* ids, const Shapes& s, int64_t b,
                          int64_t i, int64_t len) {
  if (!s.gather || i >= len) return;
  const char* row = reinterpret_cast<const char*>(step_row(rows, ids, s, b, i));
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t offset = 0; offset < s.D * int64_t(sizeof(scalar_t)); offset += 64) {
    __builtin_prefetch(row + offset);
  }
#else
  (void)row;
#endif
}

// Raises on the first valid step whose id or position is out of range, before any kernel reads
// a row. (The cloned kernels below must not throw: an exception cannot unwind through a
// multiversioned function.)
template <typename index_t>
void check_indices(const index_t* ids, const index_t* positions, const int64_t* lengths,
                   const Shapes& s) {
  for (int64_t b = 0; b < s.B; ++b) {
    TORCH_CHECK_INDEX(lengths[b] >= 0 && lengths[b] <= s.L, "lengths[", b, "] = ", lengths[b],
                      " is outside [0, L=", s.L, "]");
  }
  at::parallel_for(0, s.B, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.L)),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t i = 0; i < lengths[b]; ++i) {
        const int64_t p = int64_t(positions[b * s.L + i]);
        TORCH_CHECK_INDEX(p >= 1 && p < s.P1, "positions[", b, ", ", i, "] = ", p,
                          " is outside [1, ", s.P1 - 1, "]");
        if (s.gather) {
          const int64_t r = int64_t(ids[b * s.L + i]);
          TORCH_CHECK_INDEX(r >= 0 && r < s.N, "ids[", b, ", ", i, "] = ", r,
                            " is outside the table's rows [0, ", s.N, ")");
        }
      }
    }
  });
}

// Forward of samples [b0, b1). Cloned for AVX2: the inner loops are D-wide adds and dot
// products that the x86-64 baseline does 4 floats at a time.
template <typename scalar_t, typename index_t>
HMOE_SIMD_CLONES void forward_samples(const scalar_t* rows, const index_t* ids,
                                      const scalar_t* target, const scalar_t* pe,
                                      const index_t* positions, const int64_t* lengths,
                                      scalar_t* out, at::opmath_type<scalar_t>* alpha,
                                      at::opmath_type<scalar_t>* pooled, const Shapes& s,
                                      int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = s.D, H = s.H, Dh = s.Dh, L = s.L;
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(Dh));
  std::vector<acc_t> v(D), e(D), m(D), run_max(H), run_sum(H);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t len = lengths[b];
    acc_t* a = alpha + b * H * L;
    for (int64_t d = 0; d < D; ++d) v[d] = acc_t(target[b * D + d]) + acc_t(pe[d]);
    std::fill(m.begin(), m.end(), acc_t(0));
    std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<acc_t>::infinity());
    std::fill(run_sum.begin(), run_sum.end(), acc_t(0));
    for (int64_t i = 0; i < std::min(len, kPrefetch); ++i) prefetch_step(rows, ids, s, b, i, len);
    for (int64_t i = 0; i < len; ++i) {
      prefetch_step(rows, ids, s, b, i + kPrefetch, len);
      const scalar_t* __restrict row = step_row(rows, ids, s, b, i);
      const scalar_t* __restrict prow = pe + int64_t(positions[b * L + i]) * D;
      for (int64_t d = 0; d < D; ++d) e[d] = acc_t(row[d]) + acc_t(prow[d]);
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* __restrict eh = e.data() + h * Dh;
        const acc_t* __restrict vh = v.data() + h * Dh;
        acc_t dot = 0;
        for (int64_t d = 0; d < Dh; ++d) dot += eh[d] * vh[d];
        const acc_t score = dot * scale;
        a[h * L + i] = score;
        acc_t* __restrict mh = m.data() + h * Dh;
        if (score > run_max[h]) {  // rescale what was summed under the old max
          const acc_t shrink = std::exp(run_max[h] - score);  // exp(-inf) = 0 at the first step
          run_sum[h] *= shrink;
          for (int64_t d = 0; d < Dh; ++d) mh[d] *= shrink;
          run_max[h] = score;
        }
        const acc_t w = std::exp(score - run_max[h]);
        run_sum[h] += w;
        for (int64_t d = 0; d < Dh; ++d) mh[d] += w * eh[d];
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      acc_t* ah = a + h * L;
      if (len == 0) {
        std::fill(ah, ah + L, acc_t(0));
        continue;
      }
      const acc_t inv = acc_t(1) / run_sum[h];
      for (int64_t i = 0; i < len; ++i) ah[i] = std::exp(ah[i] - run_max[h]) * inv;
      std::fill(ah + len, ah + L, acc_t(0));
      for (int64_t d = h * Dh; d < (h + 1) * Dh; ++d) m[d] *= inv;
    }
    for (int64_t d = 0; d < D; ++d) {
      pooled[b * D + d] = m[d];
      out[b * D + d] = scalar_t(v[d] * m[d]);
    }
  }
}

// Samples per privatised position-gradient table: a function of B, P and D only.
int64_t chunk_size(const Shapes& s) {
  const int64_t table_bytes = s.P1 * s.D * int64_t(sizeof(double));
  const int64_t max_chunks = std::max<int64_t>(1, (int64_t(64) << 20) / table_bytes);
  const int64_t chunks = std::min<int64_t>({(s.B + 31) / 32, 64, max_chunks});
  return std::max<int64_t>(1, (s.B + chunks - 1) / std::max<int64_t>(1, chunks));
}

// Backward of samples [b0, b1) into one private position-gradient table dpe (P + 1, D).
template <typename scalar_t, typename index_t>
HMOE_SIMD_CLONES void backward_samples(
    const scalar_t* grad_out, const at::opmath_type<scalar_t>* grad_pooled, const scalar_t* rows,
    const index_t* ids, const scalar_t* target, const scalar_t* pe, const index_t* positions,
    const int64_t* lengths, const at::opmath_type<scalar_t>* alpha,
    const at::opmath_type<scalar_t>* pooled, scalar_t* grad_rows, scalar_t* grad_target,
    at::opmath_type<scalar_t>* dpe, const Shapes& s, int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = s.D, H = s.H, Dh = s.Dh, L = s.L;
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(Dh));
  std::vector<acc_t> v(D), dm(D), dv(D), e(D), dm_dot_m(H);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t len = lengths[b];
    const acc_t* a = alpha + b * H * L;
    const acc_t* mb = pooled + b * D;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t g = acc_t(grad_out[b * D + d]);
      v[d] = acc_t(target[b * D + d]) + acc_t(pe[d]);
      dm[d] = g * v[d] + grad_pooled[b * D + d];
      dv[d] = g * mb[d];
    }
    for (int64_t h = 0; h < H; ++h) {
      acc_t dot = 0;
      for (int64_t d = h * Dh; d < (h + 1) * Dh; ++d) dot += dm[d] * mb[d];
      dm_dot_m[h] = dot;
    }
    for (int64_t i = 0; i < std::min(len, kPrefetch); ++i) prefetch_step(rows, ids, s, b, i, len);
    for (int64_t i = 0; i < len; ++i) {
      prefetch_step(rows, ids, s, b, i + kPrefetch, len);
      const scalar_t* __restrict row = step_row(rows, ids, s, b, i);
      const int64_t p = int64_t(positions[b * L + i]);
      const scalar_t* __restrict prow = pe + p * D;
      acc_t* __restrict dprow = dpe + p * D;
      scalar_t* __restrict grow = grad_rows + (b * L + i) * D;
      for (int64_t d = 0; d < D; ++d) e[d] = acc_t(row[d]) + acc_t(prow[d]);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t lo = h * Dh, hi = lo + Dh;
        acc_t dot = 0;
        for (int64_t d = lo; d < hi; ++d) dot += dm[d] * e[d];
        const acc_t w = a[h * L + i];
        const acc_t ds_scaled = w * (dot - dm_dot_m[h]) * scale;
        for (int64_t d = lo; d < hi; ++d) {
          const acc_t de = w * dm[d] + ds_scaled * v[d];
          grow[d] = scalar_t(de);
          dprow[d] += de;
          dv[d] += ds_scaled * e[d];
        }
      }
    }
    std::fill(grad_rows + (b * L + len) * D, grad_rows + (b + 1) * L * D, scalar_t(0));
    for (int64_t d = 0; d < D; ++d) {
      grad_target[b * D + d] = scalar_t(dv[d]);
      dpe[d] += dv[d];
    }
  }
}

Shapes check_and_shape(const at::Tensor& rows, const c10::optional<at::Tensor>& ids,
                       const at::Tensor& target, const at::Tensor& pe,
                       const at::Tensor& positions, const at::Tensor& lengths,
                       int64_t num_heads) {
  HMOE_CHECK_DIM(rows, 2);
  HMOE_CHECK_DIM(target, 2);
  HMOE_CHECK_DIM(pe, 2);
  HMOE_CHECK_DIM(positions, 2);
  HMOE_CHECK_DIM(lengths, 1);
  HMOE_CHECK_INDEX_DTYPE(positions);
  HMOE_CHECK_DTYPE(lengths, at::kLong);
  TORCH_CHECK(rows.stride(1) == 1 && rows.stride(0) >= rows.size(1),
              "rows must have unit column stride, got strides ", rows.strides());
  TORCH_CHECK(target.scalar_type() == rows.scalar_type() && pe.scalar_type() == rows.scalar_type(),
              "rows, target and position_embedding must share one dtype, got ",
              rows.scalar_type(), ", ", target.scalar_type(), " and ", pe.scalar_type());
  for (const at::Tensor* t : {&target, &pe, &positions, &lengths}) {
    HMOE_CHECK_DEVICE(*t, rows.device());
    TORCH_CHECK(t->is_contiguous(), "target, position_embedding, positions and lengths must be "
                "contiguous, got a tensor of shape ", t->sizes(), " and strides ", t->strides());
  }
  Shapes s;
  s.B = target.size(0);
  s.D = target.size(1);
  s.L = positions.size(1);
  s.H = num_heads;
  s.P1 = pe.size(0);
  s.N = rows.size(0);
  s.row_stride = rows.stride(0);
  s.gather = ids.has_value();
  TORCH_CHECK(num_heads >= 1 && s.D % num_heads == 0, "num_heads must divide D=", s.D, ", got ",
              num_heads);
  s.Dh = s.D / s.H;
  TORCH_CHECK(rows.size(1) == s.D && pe.size(1) == s.D, "rows (", rows.sizes(),
              ") and position_embedding (", pe.sizes(), ") must have D=", s.D, " columns");
  TORCH_CHECK(s.P1 >= 1, "position_embedding must have at least one row, got ", pe.sizes());
  TORCH_CHECK(positions.size(0) == s.B && lengths.size(0) == s.B, "positions (", positions.sizes(),
              ") and lengths (", lengths.sizes(), ") must have B=", s.B, " rows");
  if (s.gather) {
    HMOE_CHECK_DEVICE(*ids, rows.device());
    TORCH_CHECK(ids->scalar_type() == positions.scalar_type() && ids->is_contiguous() &&
                    ids->sizes() == positions.sizes(),
                "ids must be contiguous, of positions' shape ", positions.sizes(), " and dtype ",
                positions.scalar_type(), ", got ", ids->sizes(), " ", ids->scalar_type());
  } else {
    TORCH_CHECK(s.N == s.B * s.L, "without ids, rows must be the pre-gathered (B*L=", s.B * s.L,
                ", D) behaviours, got ", rows.sizes());
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tim_attention_cpu(
    const at::Tensor& rows, const c10::optional<at::Tensor>& ids, const at::Tensor& target,
    const at::Tensor& pe, const at::Tensor& positions, const at::Tensor& lengths,
    int64_t num_heads) {
  const Shapes s = check_and_shape(rows, ids, target, pe, positions, lengths, num_heads);
  const auto stats = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({s.B, s.D}, target.options());
  auto alpha = at::empty({s.B, s.H, s.L}, target.options().dtype(stats));
  auto pooled = at::empty({s.B, s.D}, target.options().dtype(stats));
  if (s.B == 0) return {out, alpha, pooled};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "tim_attention", [&] {
    AT_DISPATCH_INDEX_TYPES(positions.scalar_type(), "tim_attention", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const index_t* id_ptr = s.gather ? ids->data_ptr<index_t>() : nullptr;
      check_indices(id_ptr, positions.data_ptr<index_t>(), lengths.data_ptr<int64_t>(), s);
      at::parallel_for(0, s.B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.L * s.D / 16)),
                       [&](int64_t b0, int64_t b1) {
        forward_samples(rows.data_ptr<scalar_t>(), id_ptr, target.data_ptr<scalar_t>(),
                        pe.data_ptr<scalar_t>(), positions.data_ptr<index_t>(),
                        lengths.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                        alpha.data_ptr<acc_t>(), pooled.data_ptr<acc_t>(), s, b0, b1);
      });
    });
  });
  return {out, alpha, pooled};
}

// The saved forward results and upstream gradients a backward gets: grad_out (B, D) of the
// inputs' dtype, grad_pooled and pooled (B, D) and alpha (B, H, L) of the stats dtype.
void check_backward_inputs(const Shapes& s, const at::Tensor& target, at::ScalarType dtype,
                           at::ScalarType stats, const at::Tensor& grad_out_in,
                           const at::Tensor& grad_pooled_in, const at::Tensor& alpha_in,
                           const at::Tensor& pooled_in) {
  TORCH_CHECK(grad_out_in.sizes() == target.sizes() && grad_out_in.scalar_type() == dtype,
              "grad_out must be (B, D) of the inputs' dtype, got ", grad_out_in.sizes(), " ",
              grad_out_in.scalar_type());
  for (const at::Tensor* t : {&grad_pooled_in, &pooled_in}) {
    TORCH_CHECK(t->sizes() == target.sizes() && t->scalar_type() == stats,
                "grad_pooled and pooled must be (B, D) ", stats, ", got ", t->sizes(), " ",
                t->scalar_type());
  }
  TORCH_CHECK(alpha_in.dim() == 3 && alpha_in.size(0) == s.B && alpha_in.size(1) == s.H &&
                  alpha_in.size(2) == s.L && alpha_in.scalar_type() == stats,
              "alpha must be (B, H, L) = (", s.B, ", ", s.H, ", ", s.L, ") ", stats, ", got ",
              alpha_in.sizes(), " ", alpha_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tim_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& grad_pooled_in, const at::Tensor& rows,
    const c10::optional<at::Tensor>& ids, const at::Tensor& target, const at::Tensor& pe,
    const at::Tensor& positions, const at::Tensor& lengths, const at::Tensor& alpha_in,
    const at::Tensor& pooled_in, int64_t num_heads) {
  const Shapes s = check_and_shape(rows, ids, target, pe, positions, lengths, num_heads);
  const auto stats = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_backward_inputs(s, target, rows.scalar_type(), stats, grad_out_in, grad_pooled_in,
                        alpha_in, pooled_in);
  for (const at::Tensor* t : {&grad_out_in, &grad_pooled_in, &alpha_in, &pooled_in}) {
    HMOE_CHECK_DEVICE(*t, rows.device());
  }
  const at::Tensor grad_out = grad_out_in.contiguous(), grad_pooled = grad_pooled_in.contiguous();
  const at::Tensor alpha = alpha_in.contiguous(), pooled = pooled_in.contiguous();
  auto grad_rows = at::empty({s.B, s.L, s.D}, target.options());
  auto grad_target = at::empty({s.B, s.D}, target.options());
  auto grad_pe = at::zeros_like(pe);
  if (s.B == 0) return {grad_rows, grad_target, grad_pe};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "tim_attention_backward", [&] {
    AT_DISPATCH_INDEX_TYPES(positions.scalar_type(), "tim_attention_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const index_t* id_ptr = s.gather ? ids->data_ptr<index_t>() : nullptr;
      check_indices(id_ptr, positions.data_ptr<index_t>(), lengths.data_ptr<int64_t>(), s);
      const int64_t chunk = chunk_size(s), chunks = (s.B + chunk - 1) / chunk;
      const int64_t table = s.P1 * s.D;
      std::vector<acc_t> partial(chunks * table, acc_t(0));
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          backward_samples(grad_out.data_ptr<scalar_t>(), grad_pooled.data_ptr<acc_t>(),
                           rows.data_ptr<scalar_t>(), id_ptr, target.data_ptr<scalar_t>(),
                           pe.data_ptr<scalar_t>(), positions.data_ptr<index_t>(),
                           lengths.data_ptr<int64_t>(), alpha.data_ptr<acc_t>(),
                           pooled.data_ptr<acc_t>(), grad_rows.data_ptr<scalar_t>(),
                           grad_target.data_ptr<scalar_t>(), partial.data() + c * table, s,
                           c * chunk, std::min(s.B, (c + 1) * chunk));
        }
      });
      scalar_t* dst = grad_pe.data_ptr<scalar_t>();
      at::parallel_for(0, table, 4096, [&](int64_t lo, int64_t hi) {
        for (int64_t x = lo; x < hi; ++x) {
          acc_t sum = 0;
          for (int64_t c = 0; c < chunks; ++c) sum += partial[c * table + x];
          dst[x] = scalar_t(sum);
        }
      });
    });
  });
  return {grad_rows, grad_target, grad_pe};
}

// ---------------------------------------------------------------------------------------------
// Fused backward: SGD or row-wise Adagrad on the item table inside backward.

// Per-sample quantities of the backward, formed once: ṽ, dm = g ⊙ ṽ + g_m, <dm, m> per head and
// the g ⊙ m part of dṽ.
template <typename scalar_t>
struct SampleGrads {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> v, dm, dm_dot_m, dv;  // (B, D), (B, D), (B, H), (B, D)
};

template <typename scalar_t>
SampleGrads<scalar_t> sample_grads(const scalar_t* grad_out,
                                   const at::opmath_type<scalar_t>* grad_pooled,
                                   const scalar_t* target, const scalar_t* pe,
                                   const at::opmath_type<scalar_t>* pooled, const Shapes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = s.D, H = s.H, Dh = s.Dh;
  SampleGrads<scalar_t> q;
  q.v.resize(s.B * D);
  q.dm.resize(s.B * D);
  q.dv.resize(s.B * D);
  q.dm_dot_m.resize(s.B * H);
  at::parallel_for(0, s.B, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t x = b * D + d;
        const acc_t g = acc_t(grad_out[x]);
        q.v[x] = acc_t(target[x]) + acc_t(pe[d]);
        q.dm[x] = g * q.v[x] + grad_pooled[x];
        q.dv[x] = g * pooled[x];
      }
      for (int64_t h = 0; h < H; ++h) {
        acc_t dot = 0;
        for (int64_t d = h * Dh; d < (h + 1) * Dh; ++d) dot += q.dm[b * D + d] * pooled[b * D + d];
        q.dm_dot_m[b * H + h] = dot;
      }
    }
  });
  return q;
}

// The valid steps sorted by row: keys[j] the row, steps[j] = b * L + i.
template <typename index_t>
void sort_steps_by_row(const index_t* ids, const int64_t* lengths, const Shapes& s,
                       std::vector<int64_t>& keys, std::vector<int64_t>& steps) {
  std::vector<int64_t> start(s.B + 1, 0);
  for (int64_t b = 0; b < s.B; ++b) start[b + 1] = start[b] + lengths[b];
  keys.resize(start[s.B]);
  steps.resize(start[s.B]);
  at::parallel_for(0, s.B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t i = 0; i < lengths[b]; ++i) {
        keys[start[b] + i] = int64_t(ids[b * s.L + i]);
        steps[start[b] + i] = b * s.L + i;
      }
    }
  });
  std::vector<int64_t> tmp, count;
  radix_sort_pairs(keys.data(), steps.data(), int64_t(keys.size()), bits_for(s.N), tmp, count);
}

// Chunk boundaries over the sorted steps, each at the start of a row's run.
std::vector<int64_t> row_aligned_chunks(const std::vector<int64_t>& keys, const Shapes& s) {
  const int64_t n = int64_t(keys.size());
  const int64_t private_bytes = (s.B + s.P1) * s.D * int64_t(sizeof(double));
  const int64_t by_memory = std::max<int64_t>(1, (int64_t(64) << 20) / private_bytes);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({n / 8192, 16, by_memory}));
  std::vector<int64_t> bounds{0};
  for (int64_t c = 1; c < chunks; ++c) {
    int64_t j = std::max(n * c / chunks, bounds.back());
    while (j > 0 && j < n && keys[j] == keys[j - 1]) ++j;
    bounds.push_back(j);
  }
  bounds.push_back(n);
  return bounds;
}

// The rows of sorted steps [j0, j1): each row's gradient summed over its steps, then one
// optimizer step on it. dv (B, D) and dpe (P + 1, D) are this chunk's private sums.
template <typename scalar_t, typename index_t>
HMOE_SIMD_CLONES void fused_rows(scalar_t* table, at::opmath_type<scalar_t>* state,
                                 int64_t state_stride, const int64_t* keys, const int64_t* steps,
                                 int64_t j0, int64_t j1, const SampleGrads<scalar_t>& q,
                                 const scalar_t* pe, const index_t* positions,
                                 const at::opmath_type<scalar_t>* alpha,
                                 at::opmath_type<scalar_t>* dv, at::opmath_type<scalar_t>* dpe,
                                 const Shapes& s, int64_t optimizer, double lr, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = s.D, H = s.H, Dh = s.Dh, L = s.L;
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(Dh));
  std::vector<acc_t> e(D), grad(D);
  int64_t j = j0;
  while (j < j1) {
    const int64_t r = keys[j];
    scalar_t* __restrict row = table + r * s.row_stride;
    std::fill(grad.begin(), grad.end(), acc_t(0));
    for (; j < j1 && keys[j] == r; ++j) {
      const int64_t step = steps[j], b = step / L, i = step % L;
      const int64_t p = int64_t(positions[step]);
      const scalar_t* __restrict prow = pe + p * D;
      const acc_t* __restrict dm = q.dm.data() + b * D;
      const acc_t* __restrict v = q.v.data() + b * D;
      acc_t* __restrict dvb = dv + b * D;
      acc_t* __restrict dprow = dpe + p * D;
      for (int64_t d = 0; d < D; ++d) e[d] = acc_t(row[d]) + acc_t(prow[d]);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t lo = h * Dh, hi = lo + Dh;
        acc_t dot = 0;
        for (int64_t d = lo; d < hi; ++d) dot += dm[d] * e[d];
        const acc_t w = alpha[(b * H + h) * L + i];
        const acc_t ds_scaled = w * (dot - q.dm_dot_m[b * H + h]) * scale;
        for (int64_t d = lo; d < hi; ++d) {
          const acc_t de = w * dm[d] + ds_scaled * v[d];
          grad[d] += de;
          dprow[d] += de;
          dvb[d] += ds_scaled * e[d];
        }
      }
    }
    acc_t step_size = acc_t(lr);
    if (optimizer == kFusedRowWiseAdagrad) {
      acc_t sq = 0;
      for (int64_t d = 0; d < D; ++d) sq += grad[d] * grad[d];
      acc_t& acc = state[r * state_stride];
      acc += sq / acc_t(D);
      step_size = acc_t(lr) / (std::sqrt(acc) + acc_t(eps));
    }
    for (int64_t d = 0; d < D; ++d) row[d] = scalar_t(acc_t(row[d]) - step_size * grad[d]);
  }
}

std::tuple<at::Tensor, at::Tensor> tim_attention_backward_fused_cpu(
    const at::Tensor& table, const at::Tensor& state, const at::Tensor& grad_out_in,
    const at::Tensor& grad_pooled_in, const at::Tensor& ids, const at::Tensor& target,
    const at::Tensor& pe, const at::Tensor& positions, const at::Tensor& lengths,
    const at::Tensor& alpha_in, const at::Tensor& pooled_in, int64_t num_heads, int64_t optimizer,
    double lr, double eps) {
  const Shapes s = check_and_shape(table, ids, target, pe, positions, lengths, num_heads);
  const auto stats = table.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_backward_inputs(s, target, table.scalar_type(), stats, grad_out_in, grad_pooled_in,
                        alpha_in, pooled_in);
  TORCH_CHECK(optimizer == kFusedSGD || optimizer == kFusedRowWiseAdagrad,
              "optimizer must be 0 (SGD) or 1 (row-wise Adagrad), got ", optimizer);
  if (optimizer == kFusedRowWiseAdagrad) {
    TORCH_CHECK(state.dim() == 1 && state.size(0) == s.N && state.scalar_type() == stats,
                "state must be an (N=", s.N, ",) ", stats, " tensor, got ", state.sizes(), " ",
                state.scalar_type());
    HMOE_CHECK_DEVICE(state, table.device());
  }
  const at::Tensor grad_out = grad_out_in.contiguous(), grad_pooled = grad_pooled_in.contiguous();
  const at::Tensor alpha = alpha_in.contiguous(), pooled = pooled_in.contiguous();
  auto grad_target = at::empty({s.B, s.D}, target.options());
  auto grad_pe = at::zeros_like(pe);
  if (s.B == 0) return {grad_target, grad_pe};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(),
                                  "tim_attention_backward_fused_", [&] {
    AT_DISPATCH_INDEX_TYPES(positions.scalar_type(), "tim_attention_backward_fused_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const index_t* id_ptr = ids.data_ptr<index_t>();
      // Every index is checked before the first row changes.
      check_indices(id_ptr, positions.data_ptr<index_t>(), lengths.data_ptr<int64_t>(), s);
      const SampleGrads<scalar_t> q =
          sample_grads(grad_out.data_ptr<scalar_t>(), grad_pooled.data_ptr<acc_t>(),
                       target.data_ptr<scalar_t>(), pe.data_ptr<scalar_t>(),
                       pooled.data_ptr<acc_t>(), s);
      std::vector<int64_t> keys, steps;
      sort_steps_by_row(id_ptr, lengths.data_ptr<int64_t>(), s, keys, steps);
      const std::vector<int64_t> bounds = row_aligned_chunks(keys, s);
      const int64_t chunks = int64_t(bounds.size()) - 1;
      const int64_t dv_size = s.B * s.D, pe_size = s.P1 * s.D, each = dv_size + pe_size;
      std::vector<acc_t> partial(chunks * each);
      acc_t* st = optimizer == kFusedRowWiseAdagrad ? state.data_ptr<acc_t>() : nullptr;
      const int64_t state_stride = optimizer == kFusedRowWiseAdagrad ? state.stride(0) : 0;
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          acc_t* mine = partial.data() + c * each;
          std::fill(mine, mine + each, acc_t(0));
          fused_rows(table.data_ptr<scalar_t>(), st, state_stride, keys.data(), steps.data(),
                     bounds[c], bounds[c + 1], q, pe.data_ptr<scalar_t>(),
                     positions.data_ptr<index_t>(), alpha.data_ptr<acc_t>(), mine,
                     mine + dv_size, s, optimizer, lr, eps);
        }
      });
      // Chunk order, then sample order: the same sums for any thread count.
      scalar_t* gt = grad_target.data_ptr<scalar_t>();
      std::vector<acc_t> dv(dv_size);
      at::parallel_for(0, dv_size, 4096, [&](int64_t lo, int64_t hi) {
        for (int64_t x = lo; x < hi; ++x) {
          acc_t sum = q.dv[x];
          for (int64_t c = 0; c < chunks; ++c) sum += partial[c * each + x];
          dv[x] = sum;
          gt[x] = scalar_t(sum);
        }
      });
      std::vector<acc_t> dpe(pe_size);
      at::parallel_for(0, pe_size, 4096, [&](int64_t lo, int64_t hi) {
        for (int64_t x = lo; x < hi; ++x) {
          acc_t sum = 0;
          for (int64_t c = 0; c < chunks; ++c) sum += partial[c * each + dv_size + x];
          dpe[x] = sum;
        }
      });
      for (int64_t b = 0; b < s.B; ++b) {  // ṽ = v + PE[0]: row 0 gets every dṽ
        for (int64_t d = 0; d < s.D; ++d) dpe[d] += dv[b * s.D + d];
      }
      scalar_t* gp = grad_pe.data_ptr<scalar_t>();
      for (int64_t x = 0; x < pe_size; ++x) gp[x] = scalar_t(dpe[x]);
    });
  });
  return {grad_target, grad_pe};
}

}  // namespace
}  // namespace hmoe

TORCH_LIBRARY_IMPL(hmoe, CPU, m) {
  m.impl("tim_attention", &hmoe::tim_attention_cpu);
  m.impl("tim_attention_backward", &hmoe::tim_attention_backward_cpu);
  m.impl("tim_attention_backward_fused_", &hmoe::tim_attention_backward_fused_cpu);
}
