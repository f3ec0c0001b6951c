// CPU kernels of the MNSE digit-code embedding (math and shapes: hmoe/ops/mnse.py).
//
// Forward: samples in parallel; each (sample, field) code is split into its digits once (shifts
// for base 2, a multiplication by the base's inverse per digit otherwise) and the selected rows of the field's tiny
// (R, K, E) table, which stays in L1/L2, are summed per base in opmath precision and written to
// the K output planes. No (B, F, sum K_b) index tensor is ever formed.
//
// Backward: every sample adds its gradient slices to the same few rows, so the batch is cut into
// chunks whose size depends only on B (never on the thread count); each chunk sums into its own
// (F, R, K, E) partial table, small enough for L2, and the partials are then added in chunk
// order. No atomics, and the result is bitwise the same for any number of threads.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "hmoe/checks.h"

namespace hmoe {
namespace {

constexpr int64_t kMissing = -1;
constexpr int64_t kModeConcat = 0, kModeSum = 1;

// Bases, digits and block starts, validated once per call.
struct Digits {
  std::vector<int64_t> bases, num_digits, starts;  // starts: first row of each base's block
  std::vector<uint64_t> inverse;                    // ceil(2^64 / b): division by multiplication
  std::vector<int64_t> first_digit;                 // index of each base's first digit in rows
  int64_t total = 0;                                // S = sum of num_digits
  int64_t rows = 0;                                 // R

  // Writes the row of each digit of code v (v >= 0), bases in order, into rows_out[0 .. S).
  void rows_of(uint64_t v, int64_t* rows_out) const {
    int64_t s = 0;
    for (size_t j = 0; j < bases.size(); ++j) {
      const uint64_t b = uint64_t(bases[j]);
      uint64_t x = v;
      if (b == 2) {
        for (int64_t i = 0; i < num_digits[j]; ++i, x >>= 1) {
          rows_out[s++] = starts[j] + 2 * i + int64_t(x & 1);
        }
        continue;
      }
      for (int64_t i = 0; i < num_digits[j]; ++i) {
        // A hardware division costs tens of cycles and a code has up to ~60 digits; for
        // x < 2^32, floor(x / b) = (x * ceil(2^64 / b)) >> 64 exactly (Lemire et al. 2019).
        const uint64_t q = x >> 32 == 0
                               ? uint64_t((static_cast<unsigned __int128>(x) * inverse[j]) >> 64)
                               : x / b;
        rows_out[s++] = starts[j] + int64_t(b) * i + int64_t(x - q * b);
        x = q;
      }
    }
  }
};

Digits make_digits(at::IntArrayRef bases, at::IntArrayRef num_digits) {
  TORCH_CHECK_VALUE(!bases.empty() && bases.size() == num_digits.size(),
                    "bases and num_digits must be non-empty and of one length, got ", bases,
                    " and ", num_digits);
  Digits d;
  d.bases = bases.vec();
  d.num_digits = num_digits.vec();
  d.starts.push_back(0);
  for (size_t j = 0; j < bases.size(); ++j) {
    TORCH_CHECK_VALUE(bases[j] >= 2 && num_digits[j] >= 1 && num_digits[j] <= 64,
                      "bases must be >= 2 and num_digits in [1, 64], got ", bases, " and ",
                      num_digits);
    d.starts.push_back(d.starts.back() + bases[j] * num_digits[j]);
    d.inverse.push_back(~uint64_t(0) / uint64_t(bases[j]) + 1);
    d.first_digit.push_back(d.total);
    d.total += num_digits[j];
  }
  d.rows = d.starts.back();
  return d;
}

// Raises on the first code below -1 (missing), before any kernel reads a row. The cloned
// kernels below must not throw: an exception cannot unwind through a multiversioned function.
template <typename code_t>
void check_code_range(const code_t* codes, int64_t B, int64_t F) {
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / F), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t f = 0; f < F; ++f) {
        const int64_t v = int64_t(codes[b * F + f]);
        TORCH_CHECK_INDEX(v >= kMissing, "codes: field ", f, " (sample ", b, ") has code ", v,
                          ", below 0 (-1 marks a missing value)");
      }
    }
  });
}

// out[e] = sum_i table[rows[i] * stride + e] for e < E. Columns go in register tiles of 16 so
// that the running sums never round-trip through memory (a store-to-load chain per row would
// cost several cycles per 8 floats and dominate the lookup).
template <typename acc_t, typename scalar_t>
inline void sum_rows(const scalar_t* __restrict table, const int64_t* __restrict rows, int64_t n,
                     int64_t stride, int64_t E, acc_t* __restrict out) {
  constexpr int64_t kTile = 16;
  int64_t e = 0;
  for (; e + kTile <= E; e += kTile) {
    acc_t tile[kTile] = {};
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* __restrict w = table + rows[i] * stride + e;
      for (int64_t c = 0; c < kTile; ++c) tile[c] += acc_t(w[c]);
    }
    for (int64_t c = 0; c < kTile; ++c) out[e + c] = tile[c];
  }
  for (; e < E; ++e) {
    acc_t sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += acc_t(table[rows[i] * stride + e]);
    out[e] = sum;
  }
}

// Samples [b0, b1) of the forward. Cloned for AVX2 (picked at load time where the CPU has it):
// the inner loops are E-wide sums that the x86-64 baseline can only do 4 floats at a time.
template <typename scalar_t, typename code_t>
HMOE_SIMD_CLONES void forward_samples(const scalar_t* weight, const code_t* codes, scalar_t* out,
                                      const Digits& dg, int64_t B, int64_t F, int64_t K, int64_t E,
                                      int64_t mode, int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = int64_t(dg.bases.size());
  const int64_t width = mode == kModeConcat ? nb * E : E;  // output columns per (k, b, f)
  const int64_t plane = B * F * width;
  const int64_t RKE = dg.rows * K * E;
  std::vector<int64_t> rows(dg.total);
  std::vector<acc_t> acc(width);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t f = 0; f < F; ++f) {
      const int64_t v = int64_t(codes[b * F + f]);  // checked by check_code_range
      scalar_t* dst = out + (b * F + f) * width;
      if (v == kMissing) {
        for (int64_t k = 0; k < K; ++k) std::fill(dst + k * plane, dst + k * plane + width, scalar_t(0));
        continue;
      }
      dg.rows_of(uint64_t(v), rows.data());
      const scalar_t* table = weight + f * RKE;
      for (int64_t k = 0; k < K; ++k) {
        if (mode == kModeConcat) {  // each base's sum fills its own E columns
          for (int64_t j = 0; j < nb; ++j) {
            sum_rows(table + k * E, rows.data() + dg.first_digit[j], dg.num_digits[j], K * E, E,
                     acc.data() + j * E);
          }
        } else {  // all digits of all bases into the same E columns
          sum_rows(table + k * E, rows.data(), dg.total, K * E, E, acc.data());
        }
        for (int64_t c = 0; c < width; ++c) dst[k * plane + c] = scalar_t(acc[c]);
      }
    }
  }
}

template <typename scalar_t, typename code_t>
void forward_kernel(const scalar_t* weight, const code_t* codes, scalar_t* out, const Digits& dg,
                    int64_t B, int64_t F, int64_t K, int64_t E, int64_t mode) {
  check_code_range(codes, B, F);
  at::parallel_for(0, B, std::max<int64_t>(1, 256 / F), [&](int64_t b0, int64_t b1) {
    forward_samples(weight, codes, out, dg, B, F, K, E, mode, b0, b1);
  });
}

// Chunk of samples per partial table: depends on B only, so sums do not depend on threads.
int64_t chunk_size(int64_t B) { return std::max<int64_t>(256, (B + 63) / 64); }

// Adds samples [b0, b1) into one partial (F, R, K, E) table (AVX2 clone as for the forward).
template <typename scalar_t, typename code_t>
HMOE_SIMD_CLONES void backward_samples(const scalar_t* grad, const code_t* codes,
                                       at::opmath_type<scalar_t>* part, const Digits& dg,
                                       int64_t B, int64_t F, int64_t K, int64_t E, int64_t mode,
                                       int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = int64_t(dg.bases.size());
  const int64_t width = mode == kModeConcat ? nb * E : E;
  const int64_t plane = B * F * width;
  std::vector<int64_t> rows(dg.total);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t f = 0; f < F; ++f) {
      const int64_t v = int64_t(codes[b * F + f]);  // checked by check_code_range
      if (v == kMissing) continue;
      dg.rows_of(uint64_t(v), rows.data());
      acc_t* field = part + f * dg.rows * K * E;
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* g_base = grad + k * plane + (b * F + f) * width;
        for (int64_t j = 0, s = 0; j < nb; ++j) {
          const scalar_t* __restrict g = g_base + (mode == kModeConcat ? j * E : 0);
          for (int64_t i = 0; i < dg.num_digits[j]; ++i, ++s) {
            acc_t* __restrict a = field + (rows[s] * K + k) * E;
            for (int64_t e = 0; e < E; ++e) a[e] += acc_t(g[e]);
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename code_t>
void backward_kernel(const scalar_t* grad, const code_t* codes, scalar_t* grad_weight,
                     const Digits& dg, int64_t B, int64_t F, int64_t K, int64_t E, int64_t mode) {
  using acc_t = at::opmath_type<scalar_t>;
  check_code_range(codes, B, F);
  const int64_t table = F * dg.rows * K * E;  // one partial: (F, R, K, E)
  const int64_t chunk = chunk_size(B), chunks = (B + chunk - 1) / chunk;
  std::vector<acc_t> partial(chunks * table);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* part = partial.data() + c * table;
      std::fill(part, part + table, acc_t(0));
      backward_samples(grad, codes, part, dg, B, F, K, E, mode, c * chunk,
                       std::min(B, (c + 1) * chunk));
    }
  });
  at::parallel_for(0, table, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t x = lo; x < hi; ++x) {
      acc_t sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partial[c * table + x];
      grad_weight[x] = scalar_t(sum);
    }
  });
}

void check_codes(const at::Tensor& codes, const at::Tensor& like) {
  HMOE_CHECK_INDEX_DTYPE(codes);
  HMOE_CHECK_DIM(codes, 2);
  HMOE_CHECK_DEVICE(codes, like.device());
}

at::Tensor mnse_cpu(const at::Tensor& weight_in, const at::Tensor& codes_in, at::IntArrayRef bases,
                    at::IntArrayRef num_digits, int64_t mode) {
  const Digits dg = make_digits(bases, num_digits);
  HMOE_CHECK_DIM(weight_in, 4);
  check_codes(codes_in, weight_in);
  TORCH_CHECK_VALUE(mode == kModeConcat || mode == kModeSum, "mode must be 0 (concat) or 1 (sum), got ",
                    mode);
  const int64_t F = weight_in.size(0), K = weight_in.size(2), E = weight_in.size(3);
  TORCH_CHECK_VALUE(weight_in.size(1) == dg.rows, "weight has ", weight_in.size(1),
                    " rows per field but bases ", bases, " with num_digits ", num_digits,
                    " need ", dg.rows);
  TORCH_CHECK_VALUE(codes_in.size(1) == F, "codes must be (B, F=", F, "), got shape ",
                    codes_in.sizes());
  const int64_t B = codes_in.size(0);
  const at::Tensor weight = weight_in.contiguous(), codes = codes_in.contiguous();
  const int64_t width = mode == kModeConcat ? int64_t(bases.size()) * E : E;
  auto out = at::empty({K, B, F, width}, weight.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "mnse", [&] {
    AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "mnse", [&] {
      forward_kernel(weight.data_ptr<scalar_t>(), codes.data_ptr<index_t>(),
                     out.data_ptr<scalar_t>(), dg, B, F, K, E, mode);
    });
  });
  return out;
}

at::Tensor mnse_backward_cpu(const at::Tensor& grad_in, const at::Tensor& codes_in,
                             at::IntArrayRef bases, at::IntArrayRef num_digits, int64_t mode) {
  const Digits dg = make_digits(bases, num_digits);
  HMOE_CHECK_DIM(grad_in, 4);
  check_codes(codes_in, grad_in);
  TORCH_CHECK_VALUE(mode == kModeConcat || mode == kModeSum, "mode must be 0 (concat) or 1 (sum), got ",
                    mode);
  const int64_t K = grad_in.size(0), B = codes_in.size(0), F = codes_in.size(1);
  const int64_t nb = int64_t(bases.size());
  TORCH_CHECK_VALUE(grad_in.size(1) == B && grad_in.size(2) == F, "grad must be (K, B=", B, ", F=",
                    F, ", ·), got shape ", grad_in.sizes());
  TORCH_CHECK_VALUE(mode == kModeSum || grad_in.size(3) % nb == 0, "grad's last dim (",
                    grad_in.size(3), ") must be len(bases) * E in mode concat");
  const int64_t E = mode == kModeConcat ? grad_in.size(3) / nb : grad_in.size(3);
  const at::Tensor grad = grad_in.contiguous(), codes = codes_in.contiguous();
  auto grad_weight = at::zeros({F, dg.rows, K, E}, grad.options());
  if (grad.numel() == 0 || grad_weight.numel() == 0) return grad_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mnse_backward", [&] {
    AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "mnse_backward", [&] {
      backward_kernel(grad.data_ptr<scalar_t>(), codes.data_ptr<index_t>(),
                      grad_weight.data_ptr<scalar_t>(), dg, B, F, K, E, mode);
    });
  });
  return grad_weight;
}

}  // namespace
}  // namespace hmoe

TORCH_LIBRARY_IMPL(hmoe, CPU, m) {
  m.impl("mnse", &hmoe::mnse_cpu);
  m.impl("mnse_backward", &hmoe::mnse_backward_cpu);
}
