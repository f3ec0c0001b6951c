// CPU kernels of the fused multi-embedding lookup (math and shapes: hmoe/ops/multi_embedding.py).
//
// Forward: one pass over the (sample, field) slots; each slot reads its K*D-wide row once and
// writes K planes of the (K, B, F, D) output. Rows a few slots ahead are prefetched, because for
// tables larger than the caches a lookup is bound by misses in flight, not by bandwidth.
//
// Backward: every lookup contributes grad[:, b, f, :] (times 1/length for mean pooling) to one
// weight row. The (row, segment) pairs are radix-sorted by row (stable, so the summation order is
// fixed and the result deterministic), each run of equal rows is summed once in registers, and
// the sum is handed to an "apply" step: write a dense gradient, write a sparse row gradient, or
// update the row in place with SGD / row-wise Adagrad. No thread ever writes a row another thread
// writes, so no atomics are needed.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "hmoe/checks.h"
#include "hmoe/multi_embedding.h"

namespace hmoe {
namespace {

constexpr int64_t kPrefetchDistance = 8;

// Global row of a per-field local id; raises naming the field, the sample and the bad id.
inline int64_t checked_row(int64_t id, int64_t f, int64_t b, const int64_t* table_offsets) {
  const int64_t vocab = table_offsets[f + 1] - table_offsets[f];
  TORCH_CHECK_INDEX(id >= 0 && id < vocab, "indices: field ", f, " (sample ", b, ") has id ", id,
              ", outside [0, ", vocab, ")");
  return table_offsets[f] + id;
}

// Where lookups come from: single-hot slots s = b * F + f, or field-major jagged segments
// s = f * B + b whose values are indices[segment_offsets[s] : segment_offsets[s + 1]].
struct Layout {
  int64_t B, F;
  const int64_t* segment_offsets;  // nullptr for single-hot
  bool mean;

  bool jagged() const { return segment_offsets != nullptr; }
  int64_t num_segments() const { return B * F; }
  int64_t field(int64_t s) const { return jagged() ? s / B : s % F; }
  int64_t sample(int64_t s) const { return jagged() ? s % B : s / F; }
  // Output slot b * F + f of segment s.
  int64_t slot(int64_t s) const { return jagged() ? (s % B) * F + s / B : s; }
  int64_t begin(int64_t s) const { return jagged() ? segment_offsets[s] : s; }
  int64_t end(int64_t s) const { return jagged() ? segment_offsets[s + 1] : s + 1; }
  template <typename acc_t>
  acc_t scale(int64_t s) const {
    if (!mean) return acc_t(1);
    const int64_t n = end(s) - begin(s);
    return n > 0 ? acc_t(1) / acc_t(n) : acc_t(0);
  }
};

Layout make_layout(const at::Tensor& indices, const std::optional<at::Tensor>& segment_offsets,
                   int64_t B, int64_t F, int64_t pooling) {
  Layout layout{B, F, nullptr, pooling == kPoolingMean};
  if (segment_offsets.has_value()) {
    const auto& seg = *segment_offsets;
    TORCH_CHECK(seg.is_contiguous(), "segment_offsets must be contiguous");
    layout.segment_offsets = seg.data_ptr<int64_t>();
    const int64_t nnz = indices.numel();
    const int64_t* o = layout.segment_offsets;
    TORCH_CHECK(o[0] == 0 && o[B * F] == nnz, "segment_offsets must start at 0 and end at ",
                "indices.numel() = ", nnz, ", got ", o[0], " and ", o[B * F]);
    for (int64_t s = 0; s < B * F; ++s) {
      TORCH_CHECK(o[s] <= o[s + 1], "segment_offsets must be non-decreasing: entry ", s, " is ",
                  o[s], " > entry ", s + 1, " = ", o[s + 1], " (a negative length)");
    }
  }
  return layout;
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, typename index_t>
void forward_single_hot(const scalar_t* weight, const index_t* indices,
                        const int64_t* table_offsets, scalar_t* out, const Layout& layout,
                        int64_t K, int64_t D) {
  const int64_t F = layout.F, KD = K * D, plane = layout.B * F * D;
  at::parallel_for(0, layout.num_segments(), 512, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (s + kPrefetchDistance < end) {
        const int64_t ahead = s + kPrefetchDistance;
        // An invalid id makes this address garbage; prefetches never fault.
        __builtin_prefetch(weight + (table_offsets[ahead % F] + int64_t(indices[ahead])) * KD);
      }
      const int64_t row = checked_row(indices[s], s % F, s / F, table_offsets);
      const scalar_t* src = weight + row * KD;
      scalar_t* dst = out + s * D;  // out[0, b, f, :] since s = b * F + f
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t d = 0; d < D; ++d) dst[k * plane + d] = src[k * D + d];
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void forward_jagged(const scalar_t* weight, const index_t* indices, const int64_t* table_offsets,
                    scalar_t* out, const Layout& layout, int64_t K, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t KD = K * D, plane = layout.B * layout.F * D;
  at::parallel_for(0, layout.num_segments(), 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(KD);
    for (int64_t s = begin; s < end; ++s) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t f = layout.field(s), b = layout.sample(s);
      for (int64_t j = layout.begin(s); j < layout.end(s); ++j) {
        const scalar_t* src = weight + checked_row(indices[j], f, b, table_offsets) * KD;
        for (int64_t e = 0; e < KD; ++e) acc[e] += acc_t(src[e]);
      }
      const acc_t scale = layout.scale<acc_t>(s);
      scalar_t* dst = out + layout.slot(s) * D;
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t d = 0; d < D; ++d) dst[k * plane + d] = scalar_t(acc[k * D + d] * scale);
      }
    }
  });
}

at::Tensor multi_embedding_cpu(const at::Tensor& weight, const at::Tensor& indices_in,
                               const std::optional<at::Tensor>& segment_offsets,
                               const at::Tensor& table_offsets_in, int64_t pooling) {
  const auto [B, F] =
      check_multi_embedding_args(weight, indices_in, segment_offsets, table_offsets_in, pooling);
  const int64_t K = weight.size(1), D = weight.size(2);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor table_offsets = table_offsets_in.contiguous();
  auto out = at::empty({K, B, F, D}, weight.options());
  if (out.numel() == 0) return out;
  const Layout layout = make_layout(indices, segment_offsets, B, F, pooling);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "multi_embedding", [&] {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "multi_embedding", [&] {
      if (layout.jagged()) {
        forward_jagged(weight.data_ptr<scalar_t>(), indices.data_ptr<index_t>(),
                       table_offsets.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), layout, K, D);
      } else {
        forward_single_hot(weight.data_ptr<scalar_t>(), indices.data_ptr<index_t>(),
                           table_offsets.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), layout,
                           K, D);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward: sort lookups by row, reduce each run once, apply.

// Lookups sorted by weight row: rows[i] and the segment seg[i] it came from; runs[u] ..
// runs[u + 1] delimit the u-th distinct row.
struct SortedLookups {
  std::vector<int64_t> rows, seg, runs;
  int64_t num_runs() const { return int64_t(runs.size()) - 1; }
};

// Stable LSD radix sort of (key, value) pairs, keys in [0, 2^key_bits).
void radix_sort_pairs(std::vector<int64_t>& keys, std::vector<int64_t>& values, int key_bits) {
  constexpr int kDigitBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kDigitBits;
  const int64_t n = int64_t(keys.size());
  std::vector<int64_t> keys_tmp(n), values_tmp(n), count(kBuckets);
  for (int shift = 0; shift < key_bits; shift += kDigitBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & (kBuckets - 1)];
    int64_t total = 0;
    for (auto& c : count) {
      const int64_t here = c;
      c = total;
      total += here;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = count[(keys[i] >> shift) & (kBuckets - 1)]++;
      keys_tmp[pos] = keys[i];
      values_tmp[pos] = values[i];
    }
    keys.swap(keys_tmp);
    values.swap(values_tmp);
  }
}

template <typename index_t>
SortedLookups sort_lookups(const index_t* indices, const int64_t* table_offsets,
                           const Layout& layout) {
  SortedLookups sorted;
  const int64_t nnz = layout.jagged() ? layout.segment_offsets[layout.num_segments()]
                                      : layout.num_segments();
  sorted.rows.resize(nnz);
  sorted.seg.resize(nnz);
  at::parallel_for(0, layout.num_segments(), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t f = layout.field(s), b = layout.sample(s);
      for (int64_t j = layout.begin(s); j < layout.end(s); ++j) {
        sorted.rows[j] = checked_row(indices[j], f, b, table_offsets);
        sorted.seg[j] = s;
      }
    }
  });
  radix_sort_pairs(sorted.rows, sorted.seg, bits_for(table_offsets[layout.F]));
  sorted.runs.reserve(nnz + 1);
  for (int64_t i = 0; i < nnz; ++i) {
    if (i == 0 || sorted.rows[i] != sorted.rows[i - 1]) sorted.runs.push_back(i);
  }
  sorted.runs.push_back(nnz);
  return sorted;
}

// Sums each run's gradient into acc (K * D) and calls apply(u, row, acc).
template <typename scalar_t, typename Apply>
void reduce_runs(const SortedLookups& sorted, const scalar_t* grad, const Layout& layout,
                 int64_t K, int64_t D, const Apply& apply) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t KD = K * D, plane = layout.B * layout.F * D;
  at::parallel_for(0, sorted.num_runs(), 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(KD);
    for (int64_t u = begin; u < end; ++u) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = sorted.runs[u]; i < sorted.runs[u + 1]; ++i) {
        const int64_t s = sorted.seg[i];
        const acc_t scale = layout.scale<acc_t>(s);
        const scalar_t* g = grad + layout.slot(s) * D;
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t d = 0; d < D; ++d) acc[k * D + d] += scale * acc_t(g[k * plane + d]);
        }
      }
      apply(u, sorted.rows[sorted.runs[u]], acc.data());
    }
  });
}

struct BackwardArgs {
  at::Tensor grad, indices, table_offsets;
  Layout layout;
  int64_t K, D;
};

BackwardArgs prepare_backward(const at::Tensor& grad, const at::Tensor& indices,
                              const std::optional<at::Tensor>& segment_offsets,
                              const at::Tensor& table_offsets, int64_t pooling) {
  HMOE_CHECK_DIM(grad, 4);
  // The weight's (K, D) come from grad; a (1, K, D) stand-in lets the shared checks run.
  const auto stand_in = at::empty({1, grad.size(0), grad.size(3)}, grad.options());
  const auto [B, F] =
      check_multi_embedding_args(stand_in, indices, segment_offsets, table_offsets, pooling);
  TORCH_CHECK(grad.size(1) == B && grad.size(2) == F, "grad must have shape (K, ", B, ", ", F,
              ", D), got ", grad.sizes());
  BackwardArgs args{grad.contiguous(), indices.contiguous(), table_offsets.contiguous(),
                    Layout{}, grad.size(0), grad.size(3)};
  args.layout = make_layout(args.indices, segment_offsets, B, F, pooling);
  return args;
}

// Runs the sort + reduce with apply_for(sorted) -> apply functor, dispatching dtypes.
template <typename MakeApply>
void run_backward(const BackwardArgs& a, const MakeApply& make_apply) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.grad.scalar_type(), "multi_embedding_backward", [&] {
    AT_DISPATCH_INDEX_TYPES(a.indices.scalar_type(), "multi_embedding_backward", [&] {
      const SortedLookups sorted =
          sort_lookups(a.indices.data_ptr<index_t>(), a.table_offsets.data_ptr<int64_t>(),
                       a.layout);
      reduce_runs(sorted, a.grad.data_ptr<scalar_t>(), a.layout, a.K, a.D,
                  make_apply(sorted, scalar_t(0)));
    });
  });
}

at::Tensor multi_embedding_backward_cpu(const at::Tensor& grad, const at::Tensor& indices,
                                        const std::optional<at::Tensor>& segment_offsets,
                                        const at::Tensor& table_offsets, int64_t pooling,
                                        int64_t num_rows) {
  const BackwardArgs a = prepare_backward(grad, indices, segment_offsets, table_offsets, pooling);
  TORCH_CHECK(a.table_offsets[-1].item<int64_t>() == num_rows, "num_rows (", num_rows,
              ") must equal table_offsets[-1] (", a.table_offsets[-1].item<int64_t>(), ")");
  auto grad_weight = at::zeros({num_rows, a.K, a.D}, grad.options());
  const int64_t KD = a.K * a.D;
  run_backward(a, [&](const SortedLookups&, auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* out = grad_weight.data_ptr<scalar_t>();
    return [=](int64_t, int64_t row, const auto* acc) {
      for (int64_t e = 0; e < KD; ++e) out[row * KD + e] = scalar_t(acc[e]);
    };
  });
  return grad_weight;
}

std::tuple<at::Tensor, at::Tensor> multi_embedding_backward_rows_cpu(
    const at::Tensor& grad, const at::Tensor& indices,
    const std::optional<at::Tensor>& segment_offsets, const at::Tensor& table_offsets,
    int64_t pooling) {
  const BackwardArgs a = prepare_backward(grad, indices, segment_offsets, table_offsets, pooling);
  at::Tensor rows, row_grads;
  const int64_t KD = a.K * a.D;
  run_backward(a, [&](const SortedLookups& sorted, auto zero) {
    using scalar_t = decltype(zero);
    rows = at::empty({sorted.num_runs()}, table_offsets.options());
    row_grads = at::empty({sorted.num_runs(), a.K, a.D}, grad.options());
    int64_t* rows_out = rows.data_ptr<int64_t>();
    scalar_t* grads_out = row_grads.data_ptr<scalar_t>();
    return [=](int64_t u, int64_t row, const auto* acc) {
      rows_out[u] = row;
      for (int64_t e = 0; e < KD; ++e) grads_out[u * KD + e] = scalar_t(acc[e]);
    };
  });
  if (!rows.defined()) {  // no lookups at all (B = 0)
    rows = at::empty({0}, table_offsets.options());
    row_grads = at::empty({0, a.K, a.D}, grad.options());
  }
  return {rows, row_grads};
}

void multi_embedding_backward_fused_cpu(const at::Tensor& weight, const at::Tensor& state,
                                        const at::Tensor& grad, const at::Tensor& indices,
                                        const std::optional<at::Tensor>& segment_offsets,
                                        const at::Tensor& table_offsets, int64_t pooling,
                                        int64_t optimizer, double lr, double eps) {
  const BackwardArgs a = prepare_backward(grad, indices, segment_offsets, table_offsets, pooling);
  HMOE_CHECK_DIM(weight, 3);
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(weight.size(1) == a.K && weight.size(2) == a.D, "weight shape ", weight.sizes(),
              " does not match grad shape ", grad.sizes());
  TORCH_CHECK(weight.size(0) == a.table_offsets[-1].item<int64_t>(), "weight has ",
              weight.size(0), " rows but table_offsets[-1] is ",
              a.table_offsets[-1].item<int64_t>());
  HMOE_CHECK_DTYPE(grad, weight.scalar_type());
  TORCH_CHECK(optimizer == kFusedSGD || optimizer == kFusedRowWiseAdagrad,
              "optimizer must be 0 (SGD) or 1 (row-wise Adagrad), got ", optimizer);
  const auto acc_dtype = at::toOpMathType(weight.scalar_type());
  if (optimizer == kFusedRowWiseAdagrad) {
    TORCH_CHECK(state.dim() == 2 && state.size(0) == weight.size(0) && state.size(1) == a.K &&
                    state.is_contiguous(),
                "state must be a contiguous (N, K) = (", weight.size(0), ", ", a.K,
                ") tensor, got shape ", state.sizes());
    HMOE_CHECK_DTYPE(state, acc_dtype);
  }
  const int64_t K = a.K, D = a.D, KD = K * D;
  run_backward(a, [&](const SortedLookups&, auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = weight.data_ptr<scalar_t>();
    acc_t* st = optimizer == kFusedRowWiseAdagrad ? state.data_ptr<acc_t>() : nullptr;
    const acc_t lr_ = acc_t(lr), eps_ = acc_t(eps);
    return [=](int64_t, int64_t row, const acc_t* acc) {
      scalar_t* wr = w + row * KD;
      for (int64_t k = 0; k < K; ++k) {
        acc_t step = lr_;
        if (st != nullptr) {  // row-wise Adagrad: one accumulator per (row, set)
          acc_t sq = 0;
          for (int64_t d = 0; d < D; ++d) sq += acc[k * D + d] * acc[k * D + d];
          st[row * K + k] += sq / acc_t(D);
          step = lr_ / (std::sqrt(st[row * K + k]) + eps_);
        }
        for (int64_t d = 0; d < D; ++d) {
          wr[k * D + d] = scalar_t(acc_t(wr[k * D + d]) - step * acc[k * D + d]);
        }
      }
    };
  });
}

}  // namespace
}  // namespace hmoe

TORCH_LIBRARY_IMPL(hmoe, CPU, m) {
  m.impl("multi_embedding", &hmoe::multi_embedding_cpu);
  m.impl("multi_embedding_backward", &hmoe::multi_embedding_backward_cpu);
  m.impl("multi_embedding_backward_rows", &hmoe::multi_embedding_backward_rows_cpu);
  m.impl("multi_embedding_backward_fused_", &hmoe::multi_embedding_backward_fused_cpu);
}
