// CUDA symmetrization (A + A^T) / 2 on the caller's stream.
#include <cuda_runtime.h>
#include "kfac_fast/common.h"

namespace kfac_fast {
namespace cuda {

template <typename T>
__global__ void symmetrize_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t n) {
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

void symmetrize(const void* in, void* out, int64_t batch, int64_t n, DType dtype, std::intptr_t stream) {
  if (batch == 0 || n == 0) return;
  dim3 block(16, 16);
  dim3 grid((unsigned)((n + 15) / 16), (unsigned)((n + 15) / 16), (unsigned)batch);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == DType::Float32) {
    symmetrize_kernel<float><<<grid, block, 0, s>>>(static_cast<const float*>(in), static_cast<float*>(out), n);
  } else {
    symmetrize_kernel<double><<<grid, block, 0, s>>>(static_cast<const double*>(in), static_cast<double*>(out), n);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw Error(std::string("symmetrize launch failed: ") + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace kfac_fast
