// CUDA symmetrization (A + A^T) / 2. Device code only (embedded fatbin); the launch on the
// caller's stream is in symmetrize_host.cpp.
#include <cstdint>

#include "kfac_fast/cuda_kernels.h"

namespace kfac_fast {
namespace cuda {

template <typename T>
__device__ __forceinline__ void symmetrize_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t n) {
  const int64_t b = blockIdx.z;
  const int64_t i = blockIdx.y * blockDim.y + threadIdx.y;
  const int64_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n || j >= n || j < i) return;
  const T* A = in + b * n * n;
  T* S = out + b * n * n;
  const T v = (A[i * n + j] + A[j * n + i]) / T(2);
  S[i * n + j] = v;
  S[j * n + i] = v;
}

}  // namespace cuda
}  // namespace kfac_fast

// Blocks of 16 x 16 threads, grid (ceil(n/16), ceil(n/16), batch).
extern "C" __global__ void kfac_fast_symmetrize_f32(const float* __restrict__ in, float* __restrict__ out,
                                                    int64_t n) {
  kfac_fast::cuda::symmetrize_kernel<float>(in, out, n);
}

extern "C" __global__ void kfac_fast_symmetrize_f64(const double* __restrict__ in, double* __restrict__ out,
                                                    int64_t n) {
  kfac_fast::cuda::symmetrize_kernel<double>(in, out, n);
}
