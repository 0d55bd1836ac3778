// CPU symmetrization (A + A^T) / 2: the trivial "K-FAC-free" native op used to
// check the build, the pointer-passing convention and the custom-op plumbing.
#include "kfac_fast/common.h"

namespace kfac_fast {
namespace cpu {

template <typename T>
static void symmetrize_impl(const T* in, T* out, int64_t batch, int64_t n) {
  for (int64_t b = 0; b < batch; ++b) {
    const T* A = in + b * n * n;
    T* S = out + b * n * n;
    for (int64_t i = 0; i < n; ++i) {
      S[i * n + i] = A[i * n + i];
      for (int64_t j = i + 1; j < n; ++j) {
        const T v = (A[i * n + j] + A[j * n + i]) / T(2);
        S[i * n + j] = v;
        S[j * n + i] = v;
      }
    }
  }
}

void symmetrize(const void* in, void* out, int64_t batch, int64_t n, DType dtype) {
  if (batch < 0 || n < 0) throw Error("symmetrize: negative size");
  switch (dtype) {
    case DType::Float32:
      symmetrize_impl(static_cast<const float*>(in), static_cast<float*>(out), batch, n);
      break;
    case DType::Float64:
      symmetrize_impl(static_cast<const double*>(in), static_cast<double*>(out), batch, n);
      break;
    default:
      throw Error("symmetrize: unsupported dtype");
  }
}

}  // namespace cpu

#ifndef KFAC_FAST_WITH_CUDA
namespace cuda {
void symmetrize(const void*, void*, int64_t, int64_t, DType, std::intptr_t) {
  throw Error("this build of kfac_fast._C has no CUDA code (built with KFAC_FAST_CUDA=OFF or without nvcc); "
              "rebuild with nvcc on PATH to run native ops on CUDA tensors");
}
}  // namespace cuda
#endif

}  // namespace kfac_fast
