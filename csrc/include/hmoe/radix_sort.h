// Stable LSD radix sort of (key, value) pairs, shared by the CPU backward kernels that group
// lookups by table row (multi-embedding, TIM's fused update).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace hmoe {

// Stable LSD radix sort of n (key, value) pairs in place, keys in [0, 2^key_bits). Digits are
// at most 11 bits so the histogram stays in L1; `tmp` and `count` are reusable scratch.
inline void radix_sort_pairs(int64_t* keys, int64_t* values, int64_t n, int key_bits,
                             std::vector<int64_t>& tmp, std::vector<int64_t>& count) {
  if (n < 2 || key_bits == 0) return;
  const int passes = (key_bits + 10) / 11;
  const int digit_bits = (key_bits + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << digit_bits;
  tmp.resize(2 * n);
  count.resize(buckets);
  int64_t *src_k = keys, *src_v = values, *dst_k = tmp.data(), *dst_v = tmp.data() + n;
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * digit_bits;
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(src_k[i] >> shift) & (buckets - 1)];
    int64_t total = 0;
    for (auto& c : count) {
      const int64_t here = c;
      c = total;
      total += here;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = count[(src_k[i] >> shift) & (buckets - 1)]++;
      dst_k[pos] = src_k[i];
      dst_v[pos] = src_v[i];
    }
    std::swap(src_k, dst_k);
    std::swap(src_v, dst_v);
  }
  if (src_k != keys) {  // an odd number of passes left the result in the scratch buffer
    std::copy(src_k, src_k + n, keys);
    std::copy(src_v, src_v + n, values);
  }
}

}  // namespace hmoe
