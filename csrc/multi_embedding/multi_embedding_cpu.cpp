// CPU kernels of the fused multi-embedding lookup (math and shapes: hmoe/ops/multi_embedding.py).
//
// Forward: one pass over the (sample, field) slots; each slot reads its K*D-wide row once and
// writes K planes of the (K, B, F, D) output. Rows a few slots ahead are prefetched, because for
// tables larger than the caches a lookup is bound by misses in flight, not by bandwidth.
//
// Backward: every lookup contributes c_s * grad[:, b, f, :] to one weight row. Three phases:
//  1. group: field f's rows are [o_f, o_{f+1}), so each field's lookups are radix-sorted by row on
//     their own (fields in parallel) to number the batch's distinct rows ("runs", U of them);
//  2. accumulate: the gradient is streamed in memory order — sample after sample, the K planes
//     side by side — and each lookup's K*D values are added to its run's row of a (U, K, D)
//     buffer. Walking the gradient in row order instead would read it in random 64-byte pieces
//     and is several times slower on tables that miss the caches. Each thread owns a range of
//     fields, and so of runs: no two threads add into one value;
//  3. apply: each run's sum is handed once to an "apply" step that writes a dense gradient,
//     writes a sparse row gradient, or updates the row in place with SGD / row-wise Adagrad.
// Fused SGD on fp32 / fp64 weights skips all three and updates rows lookup by lookup (see
// sgd_in_order).
// Every sum is taken in a fixed order, so results are deterministic.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "hmoe/checks.h"
#include "hmoe/radix_sort.h"
#include "hmoe/multi_embedding.h"

namespace hmoe {
namespace {

constexpr int64_t kPrefetchDistance = 8;  // lookups in flight ahead of the one being copied
constexpr int64_t kCacheLine = 64;

// Prefetches every cache line of a row: a K*D row spans several lines, and the hardware's
// adjacent-line prefetcher covers at most two of them.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t count, bool for_write = false) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = count * int64_t(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += kCacheLine) {
    if (for_write) {
      __builtin_prefetch(p + off, 1);
    } else {
      __builtin_prefetch(p + off, 0);
    }
  }
}

// Global row of a per-field local id; raises naming the field, the sample and the bad id.
inline int64_t checked_row(int64_t id, int64_t f, int64_t b, const int64_t* table_offsets) {
  const int64_t vocab = table_offsets[f + 1] - table_offsets[f];
  TORCH_CHECK_INDEX(id >= 0 && id < vocab, "indices: field ", f, " (sample ", b, ") has id ", id,
              ", outside [0, ", vocab, ")");
  return table_offsets[f] + id;
}

// table_offsets are read on the host by every CPU kernel: they must describe F fields that
// tile [0, num_rows) in order, or a valid local id could still address a row outside the table.
void check_table_offsets(const at::Tensor& table_offsets, int64_t num_rows) {
  const int64_t* o = table_offsets.data_ptr<int64_t>();
  const int64_t F = table_offsets.numel() - 1;
  TORCH_CHECK_VALUE(o[0] == 0, "table_offsets must start at 0, got ", o[0]);
  for (int64_t f = 0; f < F; ++f) {
    TORCH_CHECK_VALUE(o[f] <= o[f + 1], "table_offsets must be non-decreasing: field ", f,
                " starts at ", o[f], " but field ", f + 1, " at ", o[f + 1]);
  }
  TORCH_CHECK_VALUE(o[F] == num_rows, "table_offsets must end at the number of rows (", num_rows,
              "), got ", o[F]);
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
  // Split by samples; slots s = b * F + f are walked with running (b, f) counters, because an
  // integer division per lookup costs as much as the copy itself.
  const int64_t grain = std::max<int64_t>(1, 512 / F);
  at::parallel_for(0, layout.B, grain, [&](int64_t b_begin, int64_t b_end) {
    const int64_t end = b_end * F;
    int64_t ahead_f = kPrefetchDistance % F;  // field of slot s + kPrefetchDistance
    for (int64_t b = b_begin, s = b_begin * F; b < b_end; ++b) {
      for (int64_t f = 0; f < F; ++f, ++s) {
        if (s + kPrefetchDistance < end) {
          // An invalid id makes this address garbage; prefetches never fault.
          const int64_t ahead = s + kPrefetchDistance;
          prefetch_row(weight + (table_offsets[ahead_f] + int64_t(indices[ahead])) * KD, KD);
        }
        ahead_f = ahead_f + 1 == F ? 0 : ahead_f + 1;
        const scalar_t* src = weight + checked_row(indices[s], f, b, table_offsets) * KD;
        scalar_t* dst = out + s * D;  // out[0, b, f, :]
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t d = 0; d < D; ++d) dst[k * plane + d] = src[k * D + d];
        }
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
      const int64_t seg_end = layout.end(s);
      for (int64_t j = layout.begin(s); j < seg_end; ++j) {
        if (j + kPrefetchDistance < seg_end) {  // garbage ids only make a harmless prefetch
          prefetch_row(weight + (table_offsets[f] + int64_t(indices[j + kPrefetchDistance])) * KD, KD);
        }
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
  check_table_offsets(table_offsets, weight.size(0));
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
// Backward: group each field's lookups by row, accumulate in input order, apply once per row.

// One field's lookups grouped by row: its distinct rows in increasing order, and for each of
// its lookups j (positions in `indices`) the local run index, written to run_of[j].
template <typename index_t>
void group_field(const index_t* indices, const int64_t* table_offsets, const Layout& layout,
                 int64_t f, std::vector<int64_t>& field_rows, int64_t* run_of,
                 std::vector<int64_t>& keys, std::vector<int64_t>& positions,
                 std::vector<int64_t>& tmp, std::vector<int64_t>& count) {
  keys.clear();
  positions.clear();
  for (int64_t b = 0; b < layout.B; ++b) {
    const int64_t s = layout.jagged() ? f * layout.B + b : b * layout.F + f;
    for (int64_t j = layout.begin(s); j < layout.end(s); ++j) {
      keys.push_back(checked_row(indices[j], f, b, table_offsets) - table_offsets[f]);
      positions.push_back(j);
    }
  }
  const int64_t n = int64_t(keys.size());
  radix_sort_pairs(keys.data(), positions.data(), n,
                   bits_for(table_offsets[f + 1] - table_offsets[f]), tmp, count);
  field_rows.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || keys[i] != keys[i - 1]) field_rows.push_back(table_offsets[f] + keys[i]);
    run_of[positions[i]] = int64_t(field_rows.size()) - 1;
  }
}

// The batch's lookups grouped by row (phase 1).
struct Runs {
  std::vector<int64_t> rows;       // (U,) distinct rows, increasing
  std::vector<int64_t> run_of;     // (nnz,) run of lookup j, local to its field
  std::vector<int64_t> first_run;  // (F + 1,) runs of the fields before f
};

template <typename index_t>
Runs group_lookups(const index_t* indices, const int64_t* table_offsets, const Layout& layout,
                   int64_t nnz) {
  const int64_t F = layout.F;
  Runs runs;
  runs.run_of.resize(nnz);
  runs.first_run.assign(F + 1, 0);
  std::vector<std::vector<int64_t>> field_rows(F);
  at::parallel_for(0, F, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> keys, positions, tmp, count;
    for (int64_t f = lo; f < hi; ++f) {
      group_field(indices, table_offsets, layout, f, field_rows[f], runs.run_of.data(), keys,
                  positions, tmp, count);
    }
  });
  for (int64_t f = 0; f < F; ++f) runs.first_run[f + 1] = runs.first_run[f] + int64_t(field_rows[f].size());
  runs.rows.reserve(runs.first_run[F]);
  for (const auto& r : field_rows) runs.rows.insert(runs.rows.end(), r.begin(), r.end());
  return runs;
}

// Splits fields [0, F) into at most `parts` contiguous ranges of about equal numbers of lookups;
// returns the range bounds (parts + 1 entries, some ranges may be empty).
std::vector<int64_t> split_fields(const Layout& layout, int64_t parts) {
  const int64_t F = layout.F, B = layout.B;
  std::vector<int64_t> before(F + 1, 0);  // lookups of the fields before f
  for (int64_t f = 0; f < F; ++f) {
    before[f + 1] = before[f] + (layout.jagged() ? layout.segment_offsets[(f + 1) * B] -
                                                       layout.segment_offsets[f * B]
                                                 : B);
  }
  std::vector<int64_t> bounds(parts + 1, F);
  bounds[0] = 0;
  for (int64_t p = 1, f = 0; p < parts; ++p) {
    const int64_t target = (before[F] * p + parts - 1) / parts;
    while (f < F && before[f] < target) ++f;
    bounds[p] = f;
  }
  return bounds;
}

// Phase 2: acc (U, K, D) = the sum of each run's lookups. A thread owns a range of fields, hence
// a disjoint range of runs: no atomics, no private copies to merge. Each thread walks samples in
// order and, per sample, its fields' slots, so the K planes of the gradient are read as K
// sequential streams; a row's sum is taken in sample order whatever the number of threads.
template <typename scalar_t>
void accumulate(const Runs& runs, const scalar_t* grad, const Layout& layout, int64_t K, int64_t D,
                std::vector<at::opmath_type<scalar_t>>& acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t KD = K * D, F = layout.F, B = layout.B, plane = B * F * D;
  acc.resize(runs.rows.size() * KD);
  const int64_t parts = std::min<int64_t>(F, at::get_num_threads());
  const std::vector<int64_t> bounds = split_fields(layout, parts);
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t f0 = bounds[p], f1 = bounds[p + 1];
      if (f0 == f1) continue;
      std::fill(acc.begin() + runs.first_run[f0] * KD, acc.begin() + runs.first_run[f1] * KD,
                acc_t(0));
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t f = f0; f < f1; ++f) {
          const int64_t slot = b * F + f;
          const int64_t s = layout.jagged() ? f * B + b : slot;
          const acc_t scale = layout.scale<acc_t>(s);
          const scalar_t* __restrict g = grad + slot * D;
          if (b + 1 < B) {  // the next sample's rows of this field: random rows of a big buffer
            const int64_t next = layout.jagged() ? s + 1 : s + F;
            const int64_t j_end = std::min(layout.end(next), layout.begin(next) + 2);
            for (int64_t j = layout.begin(next); j < j_end; ++j) {
              prefetch_row(acc.data() + (runs.first_run[f] + runs.run_of[j]) * KD, KD,
                           /*for_write=*/true);
            }
          }
          for (int64_t j = layout.begin(s); j < layout.end(s); ++j) {
            acc_t* __restrict a = acc.data() + (runs.first_run[f] + runs.run_of[j]) * KD;
            for (int64_t k = 0; k < K; ++k) {
              for (int64_t d = 0; d < D; ++d) a[k * D + d] += scale * acc_t(g[k * plane + d]);
            }
          }
        }
      }
    }
  });
}

// Phase 3: apply(u, row, sum of run u) for every run, runs in parallel. `target` (nullable) is
// the (N, K, D) tensor whose rows apply writes, prefetched a few runs ahead because large
// fields write scattered rows.
template <typename acc_t, typename target_t, typename Apply>
void apply_runs(const Runs& runs, const std::vector<acc_t>& acc, int64_t KD,
                const target_t* target, const Apply& apply) {
  const int64_t U = int64_t(runs.rows.size());
  at::parallel_for(0, U, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) {
      if (target != nullptr && u + kPrefetchDistance < hi) {
        prefetch_row(target + runs.rows[u + kPrefetchDistance] * KD, KD, /*for_write=*/true);
      }
      apply(u, runs.rows[u], acc.data() + u * KD);
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

// The three backward phases, dispatching dtypes. make_apply(U, scalar_t zero) returns the
// (N, K, D) tensor whose rows apply writes (nullptr if none) and the apply functor; it runs once,
// after the lookups are grouped.
template <typename MakeApply>
void run_backward(const BackwardArgs& a, const MakeApply& make_apply) {
  const int64_t nnz = a.layout.jagged() ? a.layout.segment_offsets[a.layout.num_segments()]
                                        : a.layout.num_segments();
  Runs runs;
  AT_DISPATCH_INDEX_TYPES(a.indices.scalar_type(), "multi_embedding_backward", [&] {
    runs = group_lookups(a.indices.data_ptr<index_t>(), a.table_offsets.data_ptr<int64_t>(),
                         a.layout, nnz);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.grad.scalar_type(), "multi_embedding_backward", [&] {
    const auto [target, apply] = make_apply(int64_t(runs.rows.size()), scalar_t(0));
    std::vector<at::opmath_type<scalar_t>> acc;
    accumulate(runs, a.grad.data_ptr<scalar_t>(), a.layout, a.K, a.D, acc);
    apply_runs(runs, acc, a.K * a.D, target, apply);
  });
}

at::Tensor multi_embedding_backward_cpu(const at::Tensor& grad, const at::Tensor& indices,
                                        const std::optional<at::Tensor>& segment_offsets,
                                        const at::Tensor& table_offsets, int64_t pooling,
                                        int64_t num_rows) {
  const BackwardArgs a = prepare_backward(grad, indices, segment_offsets, table_offsets, pooling);
  check_table_offsets(a.table_offsets, num_rows);
  auto grad_weight = at::zeros({num_rows, a.K, a.D}, grad.options());
  const int64_t KD = a.K * a.D;
  run_backward(a, [&](int64_t, auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* out = grad_weight.data_ptr<scalar_t>();
    auto apply = [=](int64_t, int64_t row, const auto* acc) {
      for (int64_t e = 0; e < KD; ++e) out[row * KD + e] = scalar_t(acc[e]);
    };
    return std::make_pair(static_cast<const scalar_t*>(out), apply);
  });
  return grad_weight;
}

std::tuple<at::Tensor, at::Tensor> multi_embedding_backward_rows_cpu(
    const at::Tensor& grad, const at::Tensor& indices,
    const std::optional<at::Tensor>& segment_offsets, const at::Tensor& table_offsets,
    int64_t pooling) {
  const BackwardArgs a = prepare_backward(grad, indices, segment_offsets, table_offsets, pooling);
  check_table_offsets(a.table_offsets, a.table_offsets.data_ptr<int64_t>()[a.layout.F]);
  at::Tensor rows, row_grads;
  const int64_t KD = a.K * a.D;
  run_backward(a, [&](int64_t num_runs, auto zero) {
    using scalar_t = decltype(zero);
    rows = at::empty({num_runs}, table_offsets.options());
    row_grads = at::empty({num_runs, a.K, a.D}, grad.options());
    int64_t* rows_out = rows.data_ptr<int64_t>();
    scalar_t* grads_out = row_grads.data_ptr<scalar_t>();
    auto apply = [=](int64_t u, int64_t row, const auto* acc) {
      rows_out[u] = row;
      for (int64_t e = 0; e < KD; ++e) grads_out[u * KD + e] = scalar_t(acc[e]);
    };
    return std::make_pair(static_cast<const scalar_t*>(nullptr), apply);
  });
  if (!rows.defined()) {  // no lookups at all (B = 0)
    rows = at::empty({0}, table_offsets.options());
    row_grads = at::empty({0, a.K, a.D}, grad.options());
  }
  return {rows, row_grads};
}

// Raises on the first bad id (in parallel order) before anything is written.
template <typename index_t>
void check_ids(const index_t* indices, const int64_t* table_offsets, const Layout& layout) {
  at::parallel_for(0, layout.B, std::max<int64_t>(1, 2048 / layout.F), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      for (int64_t f = 0; f < layout.F; ++f) {
        const int64_t s = layout.jagged() ? f * layout.B + b : b * layout.F + f;
        for (int64_t j = layout.begin(s); j < layout.end(s); ++j) {
          checked_row(indices[j], f, b, table_offsets);
        }
      }
    }
  });
}

// Fused SGD on fp32 / fp64 weights needs no grouping: w_r - lr * sum_j g_j is applied as
// w_r - lr * g_1 - lr * g_2 ..., one lookup at a time in sample order, which is the same update up
// to float rounding (the weight is its own fp32 accumulator) and saves the sort, the (U, K, D)
// buffer and a pass over it. Threads own ranges of fields, hence of rows, so no two write one row,
// and each row sees its lookups in sample order whatever the thread count.
template <typename scalar_t, typename index_t>
void sgd_in_order(scalar_t* weight, const scalar_t* grad, const index_t* indices,
                  const int64_t* table_offsets, const Layout& layout, int64_t K, int64_t D,
                  scalar_t lr) {
  const int64_t KD = K * D, F = layout.F, B = layout.B, plane = B * F * D;
  check_ids(indices, table_offsets, layout);  // all of them, before the first row changes
  const int64_t parts = std::min<int64_t>(F, at::get_num_threads());
  const std::vector<int64_t> bounds = split_fields(layout, parts);
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t f = bounds[p]; f < bounds[p + 1]; ++f) {
          const int64_t slot = b * F + f;
          const int64_t s = layout.jagged() ? f * B + b : slot;
          if (b + 1 < B) {  // the next sample's first row of this field; never faults
            const int64_t next = layout.jagged() ? s + 1 : s + F;
            if (layout.begin(next) < layout.end(next)) {
              prefetch_row(weight + (table_offsets[f] + int64_t(indices[layout.begin(next)])) * KD,
                           KD, /*for_write=*/true);
            }
          }
          const scalar_t step = lr * layout.scale<scalar_t>(s);
          const scalar_t* __restrict g = grad + slot * D;
          for (int64_t j = layout.begin(s); j < layout.end(s); ++j) {
            scalar_t* __restrict w = weight + (table_offsets[f] + int64_t(indices[j])) * KD;
            for (int64_t k = 0; k < K; ++k) {
              for (int64_t d = 0; d < D; ++d) w[k * D + d] -= step * g[k * plane + d];
            }
          }
        }
      }
    }
  });
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
  HMOE_CHECK_DEVICE(weight, grad.device());
  check_table_offsets(a.table_offsets, weight.size(0));
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
    HMOE_CHECK_DEVICE(state, weight.device());
  }
  const int64_t K = a.K, D = a.D, KD = K * D;
  if (optimizer == kFusedSGD && !at::isReducedFloatingType(weight.scalar_type())) {
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "multi_embedding_backward_fused_", [&] {
      AT_DISPATCH_INDEX_TYPES(a.indices.scalar_type(), "multi_embedding_backward_fused_", [&] {
        sgd_in_order(weight.data_ptr<scalar_t>(), a.grad.data_ptr<scalar_t>(),
                     a.indices.data_ptr<index_t>(), a.table_offsets.data_ptr<int64_t>(), a.layout,
                     K, D, scalar_t(lr));
      });
    });
    return;
  }
  run_backward(a, [&](int64_t, auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = weight.data_ptr<scalar_t>();
    acc_t* st = optimizer == kFusedRowWiseAdagrad ? state.data_ptr<acc_t>() : nullptr;
    const acc_t lr_ = acc_t(lr), eps_ = acc_t(eps);
    auto apply = [=](int64_t, int64_t row, const acc_t* acc) {
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
    return std::make_pair(static_cast<const scalar_t*>(w), apply);
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
