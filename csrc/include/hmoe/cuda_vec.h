// Vectors of N values of T, aligned to their size, for 16-byte (or narrower) loads and stores in
// CUDA kernels: kernels choose N = 16 / sizeof(T) where the shapes and pointers allow it, else 1.
#pragma once

namespace hmoe {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* ptr) {
  return *reinterpret_cast<const Vec<T, N>*>(ptr);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, N>& value) {
  *reinterpret_cast<Vec<T, N>*>(ptr) = value;
}

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> zero_vec() {
  Vec<T, N> out;
#pragma unroll
  for (int c = 0; c < N; ++c) out.v[c] = T(0);
  return out;
}

}  // namespace hmoe
